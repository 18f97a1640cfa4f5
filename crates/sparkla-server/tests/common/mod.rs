//! Test harness: a real server on 127.0.0.1:0 over a real runtime (the sandbox when root,
//! else the process runtime, said loudly), and a real WebSocket client.

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sparkla_runtime::Runtime;
use sparkla_server::edge::jwt::Jwt;
use sparkla_server::{manager_for, Config, Server};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "test-secret-for-sparkla";

/// Tests run one at a time: leak checks count this process's descendants.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn runtime_name() -> String {
    if let Ok(r) = std::env::var("SPARKLA_TEST_RUNTIME") {
        return r;
    }
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } == 0 {
        "sandbox".into()
    } else {
        eprintln!(
            "NOTE: not root, so these server tests use the `process` runtime instead of the sandbox \
             (the sandbox needs root for cgroups and uid maps)"
        );
        "process".into()
    }
}

pub async fn make_runtime(config: &Config) -> Arc<dyn Runtime> {
    if sparkla_runtime::process::find_agent().is_none() && config.agent.is_none() {
        panic!(
            "the sparkla-agent binary is not built next to the test binary: run `cargo build --workspace` first \
             (`cargo test --workspace` builds it)"
        );
    }
    sparkla_server::runtime_for(config)
        .await
        .unwrap_or_else(|e| panic!("runtime {:?} unavailable: {e:#}", config.runtime))
}

pub fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config {
        port: 0,
        jwt_secret: Some(SECRET.into()),
        runtime: runtime_name(),
        cpu_total: 8.0,
        memory_total: 8.0,
        pool_size: 0,
        ..Default::default()
    };
    c.session_defaults.insert("cpuRequest".into(), json!(0.5));
    c.session_defaults
        .insert("memoryRequest".into(), json!(0.5));
    f(&mut c);
    c
}

pub async fn server(f: impl FnOnce(&mut Config)) -> Server {
    let c = config(f);
    let runtime = make_runtime(&c).await;
    let manager = manager_for(&c, runtime);
    Server::start(c, manager).await.expect("server starts")
}

pub fn jwt() -> Jwt {
    Jwt::new(SECRET).unwrap()
}

pub fn token(claims: Value) -> String {
    jwt().sign(&claims)
}

/// How the client presents its token.
#[derive(Clone, Debug)]
pub enum Via {
    None,
    Protocol(String),
    Bearer(String),
    Query(String),
}

pub struct Client {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub protocol: Option<String>,
    next: u64,
    pub notifications: VecDeque<Value>,
    responses: HashMap<String, Value>,
}

pub async fn connect(addr: std::net::SocketAddr, via: Via) -> Client {
    let url = match &via {
        Via::Query(t) => format!("ws://{addr}/some/path?jwt={t}"),
        _ => format!("ws://{addr}/"),
    };
    let mut req = url.into_client_request().unwrap();
    match &via {
        Via::Protocol(t) => {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&format!("executa.stenci.la+1+client1+{t}")).unwrap(),
            );
        }
        Via::Bearer(t) => {
            req.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        _ => {}
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let protocol = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_string());
    Client {
        ws,
        protocol,
        next: 1,
        notifications: VecDeque::new(),
        responses: HashMap::new(),
    }
}

pub async fn connect_token(addr: std::net::SocketAddr, claims: Value) -> Client {
    connect(addr, Via::Protocol(token(claims))).await
}

impl Client {
    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Send a request without waiting; returns its id.
    pub async fn send(&mut self, method: &str, params: Value) -> String {
        let id = format!("r{}", self.next);
        self.next += 1;
        self.send_text(
            json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string(),
        )
        .await;
        id
    }

    /// Read one message (a response is kept by id, a notification queued); None on close.
    async fn read_one(&mut self) -> Option<Value> {
        let m = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
            .await
            .expect("a message within 60 s")?;
        match m.ok()? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                Some(v)
            }
            Message::Close(_) => None,
            _ => Some(Value::Null),
        }
    }

    /// The full response to request `id`.
    pub async fn response(&mut self, id: &str) -> Value {
        loop {
            if let Some(v) = self.responses.remove(id) {
                return v;
            }
            let v = self.read_one().await.expect("connection open");
            if v.is_null() {
                continue;
            }
            match v.get("id") {
                Some(Value::String(i)) => {
                    self.responses.insert(i.clone(), v);
                }
                Some(other) if !other.is_null() => {
                    self.responses.insert(other.to_string(), v);
                }
                _ if v.get("method").is_some() => self.notifications.push_back(v),
                _ => {
                    self.responses.insert("null".into(), v);
                }
            }
        }
    }

    /// Call and return the full response.
    pub async fn call_raw(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        self.response(&id).await
    }

    /// Call and return the result (panics on error).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let r = self.call_raw(method, params).await;
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// The next notification (waiting for it).
    pub async fn notification(&mut self) -> Value {
        loop {
            if let Some(n) = self.notifications.pop_front() {
                return n;
            }
            let v = self.read_one().await.expect("connection open");
            if v.get("method").is_some() && v.get("id").is_none() {
                return v;
            }
            if let Some(Value::String(i)) = v.get("id") {
                self.responses.insert(i.clone(), v);
            }
        }
    }

    /// Wait for the server's close frame: (code, reason).
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("close within 30 s");
            match m {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v.get("method").is_some() {
                        self.notifications.push_back(v);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return (0, e.to_string()),
            }
        }
    }
}

pub fn session() -> Value {
    json!({"type":"SoftwareSession"})
}

pub fn chunk(lang: &str, text: &str) -> Value {
    json!({"type":"CodeChunk","programmingLanguage":lang,"text":text})
}

/// Processes descending from this one (zombies included).
pub fn descendants() -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut parent: HashMap<i32, i32> = HashMap::new();
    let mut names: HashMap<i32, String> = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = stat[stat.find('(').unwrap_or(0) + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if let Some(ppid) = fields.get(1).and_then(|p| p.parse().ok()) {
            parent.insert(pid, ppid);
            names.insert(pid, name);
        }
    }
    let mut out = Vec::new();
    for (&pid, _) in parent.iter() {
        let mut p = pid;
        let mut hops = 0;
        while let Some(&pp) = parent.get(&p) {
            if pp == me {
                out.push((pid, names[&pid].clone()));
                break;
            }
            p = pp;
            hops += 1;
            if hops > 64 {
                break;
            }
        }
    }
    out
}

/// Wait until this process has no descendants (a few seconds at most), else fail.
pub async fn assert_no_descendants(what: &str) {
    for _ in 0..500 {
        if descendants().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: processes left behind: {:?}", descendants());
}

/// Poll `f` until it is true (10 s at most).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// A plain HTTP/1.1 request; returns (status, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
