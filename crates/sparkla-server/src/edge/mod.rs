//! The edge: HTTP and WebSocket on one port (any path), JWT, JSON-RPC, metrics, admin.
//!
//! | route | |
//! |---|---|
//! | WebSocket upgrade, any path | JSON-RPC 2.0 (Executa); JWT from the `executa.stenci.la+1+<clientId>+<jwt>` subprotocol (echoed), `Authorization: Bearer` or `?jwt=`; refused with close 4001 |
//! | `POST /` | one JSON-RPC request, its response (401 without a valid JWT) |
//! | `GET\|POST /manifest` | the manifest |
//! | `POST /begin`, `/execute`, `/end`, `/cancel`, `/decode`, `/encode`, `/compile`, `/build` | body = params, reply = bare result or bare error |
//! | `GET /health` | `{"status":"ok"}` (503 while shutting down); no JWT needed |
//! | `GET /metrics` | Prometheus text; no JWT needed |
//! | `GET /admin` | JSON state of the server, for tokens with `admin: true` (403 otherwise) |

pub mod jwt;
pub mod rpc;
pub mod ws;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State, WebSocketUpgrade};
use axum::http::{header, request::Parts, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use sparkla_protocol::{ErrorCode, ErrorObject, Id, Request};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

use crate::config::Config;
use crate::manager::{ClientInfo, ManagerConfig, SessionManager};
use jwt::Jwt;

/// Shared by every request and connection.
pub struct AppState {
    pub manager: SessionManager,
    pub jwt: Jwt,
    pub config: Config,
    pub connections: AtomicUsize,
    pub client_seq: AtomicU64,
    /// Becomes true when the server shuts down: sockets close with 1001.
    pub closing: watch::Receiver<bool>,
    pub metrics: PrometheusHandle,
    pub server_id: String,
    pub addr: SocketAddr,
}

impl AppState {
    pub fn manifest(&self) -> Value {
        let (cpu, memory) = self.manager.free();
        json!({
            "version": 1,
            "id": self.server_id,
            "capabilities": rpc::capabilities(cpu, memory),
            "addresses": {
                "ws": [format!("ws://{}", self.addr)],
                "http": [format!("http://{}", self.addr)]
            },
            "package": {"name": "sparkla", "version": sparkla_protocol::VERSION},
            "runtime": self.manager.runtime_name()
        })
    }
}

/// The token a request carries outside the WebSocket subprotocol.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub token: Option<String>,
}

fn auth_of(parts: &Parts) -> Auth {
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let query = parts.uri.query().and_then(|q| {
        q.split('&').find_map(|kv| {
            kv.strip_prefix("jwt=")
                .map(percent_decode)
                .filter(|v| !v.is_empty())
        })
    });
    Auth {
        token: bearer.or(query),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn unauthorized() -> Response {
    metrics::counter!("sparkla_auth_failures_total").increment(1);
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"jsonrpc":"2.0","id":"","error":{"code":-32600,"message":"JWT verification failed"}}),
    )
}

/// The client an HTTP request acts as: from the token's client id (or `sub`), else a hash
/// of the token, so that the same token can end the sessions it began.
fn http_client(token: &str, claims: jwt::Claims) -> ClientInfo {
    use std::hash::{Hash, Hasher};
    let id = claims.client_id.clone().unwrap_or_else(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        token.hash(&mut h);
        format!("{:016x}", h.finish())
    });
    ClientInfo {
        id: format!("http:{id}"),
        admin: claims.admin,
        session_claims: claims.session,
    }
}

#[allow(clippy::result_large_err)] // a Response, built once per refused request
fn authorize(state: &AppState, auth: &Auth) -> Result<ClientInfo, Response> {
    let token = auth.token.as_deref().ok_or_else(unauthorized)?;
    match state.jwt.verify(token) {
        Ok(c) => Ok(http_client(token, c)),
        Err(reason) => {
            tracing::debug!(%reason, "HTTP request refused");
            Err(unauthorized())
        }
    }
}

async fn any(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let auth = auth_of(&parts);
    let is_upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade {
        return match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws::upgrade(state, ws, auth),
            Err(rejection) => rejection.into_response(),
        };
    }
    let path = parts.uri.path().trim_end_matches('/').to_string();
    let method = parts.method.clone();
    match (method, path.as_str()) {
        (Method::GET, "/health") => {
            if state.manager.is_shutting_down() {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status":"stopping"}),
                )
            } else {
                json_response(
                    StatusCode::OK,
                    &json!({"status":"ok","version":sparkla_protocol::VERSION,"runtime":state.manager.runtime_name()}),
                )
            }
        }
        (Method::GET, "/metrics") => metrics_response(&state),
        (Method::GET, "/admin") => match authorize(&state, &auth) {
            Err(r) => r,
            Ok(c) if !c.admin => json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "An admin token (\"admin\": true) is required"}),
            ),
            Ok(_) => json_response(StatusCode::OK, &admin(&state)),
        },
        (Method::POST, "") => {
            let client = match authorize(&state, &auth) {
                Ok(c) => c,
                Err(r) => return r,
            };
            let text = match read_body(&state, body).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            match rpc::handle(&state, &client, &text).await {
                Some(resp) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(resp).expect("response"),
                ),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        (Method::GET | Method::POST, p) if rpc::METHODS.contains(&p.trim_start_matches('/')) => {
            let name = p.trim_start_matches('/');
            if parts.method == Method::GET && name != "manifest" {
                return StatusCode::METHOD_NOT_ALLOWED.into_response();
            }
            let client = match authorize(&state, &auth) {
                Ok(c) => c,
                Err(r) => return r,
            };
            let text = match read_body(&state, body).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            let params: Value = if text.trim().is_empty() {
                json!({})
            } else {
                match serde_json::from_str(&text) {
                    Ok(v) => v,
                    Err(e) => {
                        let e = rpc::error_response(Id::Null, ErrorObject::parse_error(e));
                        return bare_error(e.error.expect("error"));
                    }
                }
            };
            let req = Request {
                jsonrpc: "2.0".into(),
                id: Some(Id::Null),
                method: name.to_string(),
                params: Some(params),
            };
            match rpc::call(&state, &client, &req).await {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => {
                    let e = rpc::error_response(Id::Null, e);
                    bare_error(e.error.expect("error"))
                }
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "Not found"})),
    }
}

fn bare_error(e: ErrorObject) -> Response {
    let status = match e.code {
        ErrorCode::PARSE_ERROR | ErrorCode::INVALID_REQUEST | ErrorCode::INVALID_PARAMS => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::CAPABILITY_ERROR => StatusCode::FORBIDDEN,
        ErrorCode::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(status, &serde_json::to_value(e).expect("error"))
}

#[allow(clippy::result_large_err)]
async fn read_body(state: &AppState, body: Body) -> Result<String, Response> {
    let limit = state.config.max_message_size;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        metrics::counter!("sparkla_errors_total", "code" => "message_too_big").increment(1);
        json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":format!("Invalid request: body is larger than {limit} bytes")}}),
        )
    })?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error: body is not UTF-8"}}),
        )
    })
}

/// Resident and peak resident memory of this process, bytes (from /proc/self/status).
pub fn process_rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn refresh(state: &AppState) {
    state.manager.refresh_gauges();
    let (rss, peak) = process_rss();
    metrics::gauge!("sparkla_process_resident_bytes").set(rss as f64);
    metrics::gauge!("sparkla_process_peak_resident_bytes").set(peak as f64);
    metrics::gauge!("sparkla_connections").set(state.connections.load(Ordering::SeqCst) as f64);
    metrics::gauge!("sparkla_pool_idle").set(state.manager.pool_idle() as f64);
    metrics::gauge!("sparkla_info", "version" => sparkla_protocol::VERSION, "runtime" => state.manager.runtime_name()).set(1.0);
}

fn metrics_response(state: &AppState) -> Response {
    refresh(state);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn admin(state: &AppState) -> Value {
    let (cpu_free, memory_free) = state.manager.free();
    let (rss, peak) = process_rss();
    json!({
        "id": state.server_id,
        "version": sparkla_protocol::VERSION,
        "runtime": state.manager.runtime_name(),
        "connections": state.connections.load(Ordering::SeqCst),
        "cpu": {"total": state.config.cpu_total, "free": cpu_free},
        "memory": {"total": state.config.memory_total, "free": memory_free},
        "poolIdle": state.manager.pool_idle(),
        "process": {"residentBytes": rss, "peakResidentBytes": peak},
        "sessions": state.manager.list(),
        "config": state.config.redacted(),
    })
}

fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("buckets");
            match builder.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    closing: watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    timers: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `config.host:config.port` and serve sessions of `manager`'s runtime. The JWT
    /// secret must be set.
    pub async fn start(config: Config, manager: SessionManager) -> anyhow::Result<Server> {
        let secret = config
            .jwt_secret
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no JWT secret configured"))?;
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port)
            })?;
        let addr = listener.local_addr()?;
        let (closing_tx, closing) = watch::channel(false);
        let timers = manager.spawn_timers();
        let state = Arc::new(AppState {
            manager,
            jwt: Jwt::new(&secret).map_err(|e| anyhow::anyhow!("JWT secret: {e}"))?,
            config,
            connections: AtomicUsize::new(0),
            client_seq: AtomicU64::new(1),
            closing,
            metrics: metrics_handle(),
            server_id: format!("sparkla-{:016x}", rand::random::<u64>()),
            addr,
        });
        let app = Router::new().fallback(any).with_state(state.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        tracing::info!(%addr, runtime = state.manager.runtime_name(), "listening");
        Ok(Server {
            addr,
            state,
            closing: closing_tx,
            stop: Some(stop_tx),
            task,
            timers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn manager(&self) -> &SessionManager {
        &self.state.manager
    }

    pub fn jwt(&self) -> &Jwt {
        &self.state.jwt
    }

    /// Graceful shutdown: tell clients, end every session, reclaim everything, close every
    /// socket (1001), stop accepting, wait for in-flight requests.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        tracing::info!("shutting down");
        self.state.manager.shutdown().await;
        let _ = self.closing.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.state.connections.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.timers.abort();
        match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Ok(Ok(r)) => r.map_err(Into::into),
            Ok(Err(e)) => Err(anyhow::anyhow!("server task failed: {e}")),
            Err(_) => {
                self.task.abort();
                Ok(())
            }
        }
    }
}

/// Build the manager for `config` over `runtime` (with a warm pool when `pool_size` > 0).
pub fn manager_for(config: &Config, runtime: Arc<dyn sparkla_runtime::Runtime>) -> SessionManager {
    let mc = ManagerConfig::from(config);
    if config.pool_size > 0 {
        let pool = sparkla_runtime::Pool::new(
            runtime.clone(),
            sparkla_runtime::PoolConfig {
                size: config.pool_size,
                ready_timeout: mc.start_timeout,
                // Let a new session's first executions have the CPU before its replacement
                // starts (measured: begin + execute + end 6 ms instead of 16 ms at p50).
                refill_delay: std::time::Duration::from_millis(100),
                ..Default::default()
            },
        );
        SessionManager::with_pool(runtime, mc, pool)
    } else {
        SessionManager::new(runtime, mc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb.c"), "a.b.c");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("x%4"), "x%4");
    }
}
