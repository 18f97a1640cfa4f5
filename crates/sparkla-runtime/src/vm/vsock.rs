//! The host side of Firecracker's hybrid vsock: the guest's vsock device is backed by a Unix
//! socket (`uds_path`) that Firecracker listens on. To reach guest port `P`, connect to it,
//! send `CONNECT P\n` and read `OK <host port>\n`; after that the stream is the guest
//! connection. Anything else (Firecracker closes the socket when nothing listens on `P` in
//! the guest yet) is an error; callers retry while the guest boots.

use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Why a hybrid-vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connecting to the vsock socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the vsock handshake failed: {0}")]
    Handshake(String),
    #[error("no guest listened on vsock port {port} within {waited:?} (last error: {last})")]
    Timeout {
        port: u32,
        waited: Duration,
        last: String,
    },
}

/// Connect once: `CONNECT <port>\n`, expect `OK <n>\n`. Returns the stream and the host-side
/// port number Firecracker reported.
pub async fn connect(uds_path: &Path, port: u32) -> Result<(UnixStream, u32), VsockError> {
    let mut s = UnixStream::connect(uds_path)
        .await
        .map_err(|source| VsockError::Connect {
            path: uds_path.display().to_string(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| VsockError::Handshake(format!("sending CONNECT: {e}")))?;
    // Read the reply byte by byte: whatever follows the newline belongs to the guest.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) => {
                return Err(VsockError::Handshake(format!(
                "the socket closed after CONNECT {port} (no guest listener on that port yet?){}",
                if line.is_empty() {
                    String::new()
                } else {
                    format!(", after {:?}", String::from_utf8_lossy(&line))
                }
            )))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                line.push(b[0]);
                if line.len() > 64 {
                    return Err(VsockError::Handshake(format!(
                        "reply too long: {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
            }
            Err(e) => return Err(VsockError::Handshake(format!("reading the reply: {e}"))),
        }
    }
    let reply = String::from_utf8_lossy(&line).to_string();
    let n = reply
        .strip_prefix("OK ")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .ok_or_else(|| VsockError::Handshake(format!("expected \"OK <port>\", got {reply:?}")))?;
    Ok((s, n))
}

/// Connect, retrying every few ms until the guest listens or `timeout` passes.
pub async fn connect_retry(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), VsockError> {
    let start = Instant::now();
    loop {
        match connect(uds_path, port).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if start.elapsed() >= timeout {
                    return Err(VsockError::Timeout {
                        port,
                        waited: timeout,
                        last: e.to_string(),
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
