//! The WebSocket side: authentication on upgrade, then JSON-RPC messages handled
//! concurrently, and the manager's notifications sent as JSON-RPC notifications.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderValue;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use sparkla_protocol::Notification;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

use super::{AppState, Auth};
use crate::manager::ClientInfo;

/// Close code for a missing or invalid JWT (Executa's).
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code when the server holds its maximum of connections ("try again later").
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// Close code for a message over the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the server shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;

const READ_BUFFER: usize = 8 * 1024;
const WRITE_BUFFER: usize = 8 * 1024;

/// Requests one socket may have running at once (more wait their turn).
const MAX_IN_FLIGHT: usize = 256;

/// The Executa subprotocol `executa.stenci.la+1+<clientId>[+<jwt>]`: (whole, clientId, jwt).
pub fn executa_protocol(offered: &str) -> Option<(String, String, Option<String>)> {
    for p in offered.split(',').map(str::trim) {
        let Some(rest) = p.strip_prefix("executa.stenci.la+1+") else {
            continue;
        };
        let mut parts = rest.split('+');
        let client = parts.next().filter(|c| !c.is_empty())?;
        let jwt = parts.next().filter(|j| !j.is_empty()).map(str::to_string);
        return Some((p.to_string(), client.to_string(), jwt));
    }
    None
}

pub fn upgrade(state: Arc<AppState>, mut ws: WebSocketUpgrade, auth: Auth) -> Response {
    let offered: Vec<String> = ws
        .requested_protocols()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let executa = offered.iter().find_map(|o| executa_protocol(o));
    if let Some((proto, _, _)) = &executa {
        if let Ok(v) = HeaderValue::from_str(proto) {
            ws.set_selected_protocol(v);
        }
    }
    let token = executa
        .as_ref()
        .and_then(|(_, _, jwt)| jwt.clone())
        .or(auth.token);
    let verified = match token {
        None => Err("JWT is required".to_string()),
        Some(t) => state.jwt.verify(&t),
    };
    let limit = state.config.max_message_size;
    // Small I/O buffers (tungstenite's default read buffer is 128 KiB per socket): idle
    // connections stay cheap; large messages still pass, in more reads.
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let claims = match verified {
                Ok(c) => c,
                Err(reason) => {
                    metrics::counter!("sparkla_auth_failures_total").increment(1);
                    tracing::info!(%reason, "WebSocket refused");
                    return close(socket, CLOSE_UNAUTHORIZED, &reason).await;
                }
            };
            let n = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
            let _guard = Connection(state.clone());
            if n > state.config.max_connections {
                return close(
                    socket,
                    CLOSE_TRY_AGAIN,
                    "Maximum number of connections reached",
                )
                .await;
            }
            if state.manager.is_shutting_down() {
                return close(socket, CLOSE_GOING_AWAY, "Server is shutting down").await;
            }
            let seq = state.client_seq.fetch_add(1, Ordering::Relaxed);
            let label = executa
                .map(|(_, c, _)| c)
                .or(claims.client_id.clone())
                .unwrap_or_else(|| "ws".into());
            let client = ClientInfo {
                id: format!("ws{seq}:{label}"),
                admin: claims.admin,
                session_claims: claims.session,
            };
            serve(state.clone(), socket, client).await;
        })
}

struct Connection(Arc<AppState>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate(reason, 120)),
        })))
        .await;
    // Wait (briefly) for the client's close, so the frame is not lost in a reset.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn truncate(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

async fn serve(state: Arc<AppState>, socket: WebSocket, client: ClientInfo) {
    tracing::debug!(client = %client.id, admin = client.admin, "client connected");
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let (note_tx, mut note_rx) = mpsc::channel(256);
    state.manager.connect(&client, note_tx);

    // Writer: responses, notifications, and the final close frame.
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let notes_out = out_tx.clone();
    let notifier = tokio::spawn(async move {
        while let Some(n) = note_rx.recv().await {
            let mut params = json!({"message": n.message});
            if let Some(node) = n.node {
                params["node"] = node;
            }
            let text = serde_json::to_string(&Notification::new(n.level.as_str(), params))
                .expect("notification serializes");
            if notes_out.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
    });

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut closing = state.closing.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let close_frame = loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = closing.wait_for(|c| *c) => break Some((CLOSE_GOING_AWAY, "Server is shutting down")),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let text = match msg {
            None => break None,
            Some(Err(e)) => {
                let too_big =
                    e.to_string().contains("too long") || e.to_string().contains("Space limit");
                tracing::debug!(client = %client.id, error = %e, "WebSocket read failed");
                if too_big {
                    metrics::counter!("sparkla_errors_total", "code" => "message_too_big")
                        .increment(1);
                    break Some((
                        CLOSE_TOO_BIG,
                        "Message is larger than the server's maximum message size",
                    ));
                }
                break None;
            }
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Binary(b))) => match String::from_utf8(b.to_vec()) {
                Ok(t) => t,
                Err(_) => {
                    let resp = super::rpc::error_response(
                        sparkla_protocol::Id::Null,
                        sparkla_protocol::ErrorObject::parse_error("binary message is not UTF-8"),
                    );
                    let _ = out_tx
                        .send(Message::Text(
                            serde_json::to_string(&resp).expect("json").into(),
                        ))
                        .await;
                    continue;
                }
            },
            Some(Ok(Message::Close(_))) => break None,
            Some(Ok(_)) => continue,
        };
        let permit = match in_flight.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break None,
        };
        let (state, client, out) = (state.clone(), client.clone(), out_tx.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Some(resp) = super::rpc::handle(&state, &client, &text).await {
                let text = serde_json::to_string(&resp).expect("response serializes");
                let _ = out.send(Message::Text(text.into())).await;
            }
        });
    };
    tracing::debug!(client = %client.id, "client disconnecting");
    // Leave sessions (ending those left without a client), which also ends running jobs.
    state.manager.disconnect(&client).await;
    tasks.abort_all();
    // The manager dropped its sender: the notifier drains what is queued and ends.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), notifier).await;
    if let Some((code, reason)) = close_frame {
        let _ = out_tx
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            })))
            .await;
    }
    drop(out_tx);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_parsing() {
        let (p, c, j) = executa_protocol("executa.stenci.la+1+abc+xx.yy.zz").unwrap();
        assert_eq!(
            (p.as_str(), c.as_str(), j.as_deref()),
            ("executa.stenci.la+1+abc+xx.yy.zz", "abc", Some("xx.yy.zz"))
        );
        let (_, c, j) = executa_protocol("foo, executa.stenci.la+1+abc").unwrap();
        assert_eq!((c.as_str(), j), ("abc", None));
        assert!(executa_protocol("graphql-ws").is_none());
    }
}
