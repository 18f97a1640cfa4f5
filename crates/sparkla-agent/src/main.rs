//! `sparkla-agent`: the agent that runs inside every Sparkla session.
//!
//! It serves the host's requests (execute, cancel, warmup, status, shutdown) over a byte
//! stream, newline-delimited JSON-RPC (see `sparkla_protocol::agent`), and drives one
//! persistent kernel per language. It is built fully static so that it runs unchanged in
//! any container image, environment directory or microVM, and it can be PID 1: it reaps
//! every orphan in its session.

mod kernel;
mod languages;
mod reaper;
mod server;
mod sys;

use server::{Agent, Writer};
use sparkla_protocol::agent::{DEFAULT_OUTPUT_LIMIT, MAX_LINE};
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;

const USAGE: &str = "\
sparkla-agent: executes code for a Sparkla session host

USAGE:
    sparkla-agent [OPTIONS]

Serves newline-delimited JSON-RPC on stdin/stdout unless --listen is given.

OPTIONS:
    --listen unix:PATH    Serve on a Unix socket (one connection at a time)
    --listen vsock:PORT   Serve on a vsock port (inside a microVM)
    --output-limit BYTES  Cap on the output of one execution [default: 10485760]
    --max-message BYTES   Cap on the size of one request line [default: 67108864]
    -h, --help            Print this help
    -V, --version         Print the version

Interpreters are found through SPARKLA_PYTHON, SPARKLA_BASH, SPARKLA_NODE, else PATH
(pyenv-style shims are skipped), else /usr/local/bin, /usr/bin, /bin.
";

enum Listen {
    Stdio,
    Unix(String),
    Vsock(u32),
}

struct Options {
    listen: Listen,
    output_limit: usize,
    max_line: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        listen: Listen::Stdio,
        output_limit: DEFAULT_OUTPUT_LIMIT,
        max_line: MAX_LINE,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("sparkla-agent {}", sparkla_protocol::VERSION);
                std::process::exit(0);
            }
            "--listen" => {
                let v = value("--listen")?;
                opts.listen = if let Some(path) = v.strip_prefix("unix:") {
                    Listen::Unix(path.to_string())
                } else if let Some(port) = v.strip_prefix("vsock:") {
                    Listen::Vsock(
                        port.parse()
                            .map_err(|_| format!("bad vsock port {port:?}"))?,
                    )
                } else {
                    return Err(format!("--listen takes unix:PATH or vsock:PORT, not {v:?}"));
                };
            }
            "--output-limit" => {
                opts.output_limit = value("--output-limit")?
                    .parse()
                    .map_err(|_| "--output-limit takes a number of bytes".to_string())?
            }
            "--max-message" => {
                opts.max_line = value("--max-message")?
                    .parse()
                    .map_err(|_| "--max-message takes a number of bytes".to_string())?
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(opts)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sparkla-agent: {e}");
            std::process::exit(2);
        }
    };
    sys::set_child_subreaper();
    reaper::start();
    match opts.listen {
        Listen::Stdio => {
            let out = Writer::new(Box::new(std::io::stdout()));
            let agent = Agent::new(out, opts.output_limit);
            agent.announce();
            let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin());
            if !agent.serve(&mut input, opts.max_line) {
                agent.drain(libc::STDOUT_FILENO);
            }
            agent.shutdown();
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap_or_else(|e| {
                eprintln!("sparkla-agent: cannot listen on {path}: {e}");
                std::process::exit(1)
            });
            serve_connections(opts.output_limit, opts.max_line, || {
                listener.accept().map(|(s, _)| {
                    let w = s.try_clone().expect("clone unix stream");
                    (
                        File::from(std::os::fd::OwnedFd::from(s)),
                        File::from(std::os::fd::OwnedFd::from(w)),
                    )
                })
            });
        }
        Listen::Vsock(port) => {
            let fd = vsock_listen(port).unwrap_or_else(|e| {
                eprintln!("sparkla-agent: cannot listen on vsock port {port}: {e}");
                std::process::exit(1)
            });
            serve_connections(opts.output_limit, opts.max_line, || {
                // SAFETY: accept4 on our listening socket; null address pointers are allowed.
                let conn = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: accept4 returned a new fd owned by nobody else.
                let r = unsafe { File::from_raw_fd(conn) };
                let w = r.try_clone()?;
                Ok((r, w))
            });
        }
    }
}

/// Serve one connection after another; kernels (and their state) outlive connections.
fn serve_connections(
    output_limit: usize,
    max_line: usize,
    mut accept: impl FnMut() -> std::io::Result<(File, File)>,
) {
    let out = Writer::new(Box::new(std::io::sink()));
    let agent = Agent::new(out.clone(), output_limit);
    loop {
        let (r, w) = match accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sparkla-agent: accept failed: {e}");
                continue;
            }
        };
        out.replace(Box::new(w));
        agent.announce();
        let mut input = BufReader::with_capacity(64 * 1024, r);
        if agent.serve(&mut input, max_line) {
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
        out.replace(Box::new(std::io::sink()));
    }
}

fn vsock_listen(port: u32) -> std::io::Result<i32> {
    // SAFETY: plain socket syscalls on a zeroed sockaddr_vm of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) < 0
            || libc::listen(fd, 16) < 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}
