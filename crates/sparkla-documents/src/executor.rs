//! Executors: one fresh session in which a document's chunks run in order.
//!
//! - [`Embedded`]: starts the session on a runtime in this process (the sandbox by default)
//!   and talks to its agent directly with [`AgentClient`]; output arrives streamed, so
//!   stdout and stderr stay apart.
//! - [`Remote`]: a client of a Sparkla server (Executa JSON-RPC over WebSocket):
//!   `begin`, `execute`…, `end`, as any client. The server returns each chunk's merged
//!   outputs (strings are taken as stdout).

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sparkla_protocol::agent::Ready;
use sparkla_runtime::{AgentClient, Instance, InstanceSpec, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::document::{push_text, ChunkResult, Item};
use crate::Error;

/// The fixed environment of every session, for outputs that do not depend on the host's
/// time zone, locale, hash seed or user.
pub const SESSION_ENV: [(&str, &str); 10] = [
    ("TZ", "UTC"),
    ("LANG", "C.UTF-8"),
    ("LC_ALL", "C.UTF-8"),
    ("PYTHONHASHSEED", "0"),
    ("HOSTNAME", "sparkla"),
    ("USER", "user"),
    ("LOGNAME", "user"),
    ("MPLBACKEND", "Agg"),
    ("SOURCE_DATE_EPOCH", "0"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
];

/// What the session is, for provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// `sandbox`, `docker`, `process`, or `remote`.
    pub runtime: String,
    pub environment: Value,
}

#[async_trait]
pub trait Executor: Send {
    /// Start the session.
    async fn begin(&mut self) -> Result<SessionInfo, Error>;
    /// Execute one node (CodeChunk or CodeExpression) as `job`.
    async fn execute(&mut self, job: &str, node: Value) -> Result<ChunkResult, Error>;
    /// End the session and release everything it held. Idempotent.
    async fn end(&mut self) -> Result<(), Error>;
}

/// A session on a runtime of this process.
pub struct Embedded {
    runtime: Arc<dyn Runtime>,
    spec: InstanceSpec,
    instance: Option<Box<dyn Instance>>,
    client: Option<AgentClient>,
}

impl Embedded {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        environment: Option<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut all: Vec<(String, String)> = SESSION_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in env {
            all.retain(|(ek, _)| *ek != k);
            all.push((k, v));
        }
        let spec = InstanceSpec {
            session_id: format!("execute-{}-{}", std::process::id(), nanos()),
            environment,
            env: all,
            ..Default::default()
        };
        Embedded {
            runtime,
            spec,
            instance: None,
            client: None,
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0)
}

/// The versions of the interpreters the agent found, asked of the host's binaries (the
/// sandbox and process runtimes without an environment run the host's interpreters).
async fn host_versions(ready: &Ready) -> Value {
    let mut out = serde_json::Map::new();
    for lang in &ready.languages {
        let Some(path) = &lang.interpreter else {
            continue;
        };
        let cmd = tokio::process::Command::new(path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let version = match tokio::time::timeout(Duration::from_secs(5), cmd).await {
            Ok(Ok(o)) => {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            }
            _ => String::new(),
        };
        out.insert(
            lang.name.clone(),
            json!({"interpreter": path, "version": version}),
        );
    }
    Value::Object(out)
}

/// The id (digest) and repository digests of a Docker image, for provenance.
async fn docker_image(image: &str) -> Value {
    let Ok(docker) = bollard::Docker::connect_with_local_defaults() else {
        return json!({ "name": image });
    };
    match docker.inspect_image(image).await {
        Ok(info) => json!({
            "name": image,
            "id": info.id,
            "repoDigests": info.repo_digests,
            "layers": info.root_fs.and_then(|r| r.layers),
            "recipe": info.config.and_then(|c| c.labels).and_then(|l| l.get("org.sparkla.recipe").cloned()),
        }),
        Err(_) => json!({ "name": image }),
    }
}

#[async_trait]
impl Executor for Embedded {
    async fn begin(&mut self) -> Result<SessionInfo, Error> {
        let session = |e: sparkla_runtime::RuntimeError| Error::Session(e.to_string());
        self.runtime
            .prepare(self.spec.environment.as_deref())
            .await
            .map_err(session)?;
        let mut instance = self
            .runtime
            .start(self.spec.clone())
            .await
            .map_err(session)?;
        let Some((read, write)) = instance.take_stream() else {
            let _ = instance.stop().await;
            return Err(Error::Session(
                "the instance gave no stream to its agent".into(),
            ));
        };
        self.instance = Some(instance);
        let client = AgentClient::new(read, write);
        let ready = match tokio::time::timeout(Duration::from_secs(60), client.ready()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Error::Session(e.to_string())),
            Err(_) => return Err(Error::Session("the agent did not get ready in 60 s".into())),
        };
        self.client = Some(client);
        let runtime = self.runtime.name().to_string();
        let host =
            self.spec.environment.is_none() && matches!(runtime.as_str(), "sandbox" | "process");
        let mut environment = json!({
            "name": self.spec.environment.clone().unwrap_or_else(|| if host { "host".into() } else { "default".into() }),
            "agent": ready.version,
            "languages": ready.languages,
            "variables": self.spec.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        });
        if host {
            environment["interpreters"] = host_versions(&ready).await;
        }
        if runtime == "docker" {
            let image = self
                .spec
                .environment
                .clone()
                .unwrap_or_else(|| sparkla_runtime::docker::DEFAULT_IMAGE.to_string());
            environment["name"] = json!(image);
            environment["image"] = docker_image(&image).await;
        }
        Ok(SessionInfo {
            runtime,
            environment,
        })
    }

    async fn execute(&mut self, job: &str, node: Value) -> Result<ChunkResult, Error> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Error::Session("no session".into()))?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let result = client
            .execute(job, node, Some(tx))
            .await
            .map_err(|e| Error::Session(e.to_string()))?;
        // The agent streams a job's output before its response: it is all here.
        let mut items = Vec::new();
        while let Ok(out) = rx.try_recv() {
            match (out.stream, out.text, out.node) {
                (Some(stream), Some(text), _) => push_text(&mut items, stream, &text),
                (_, _, Some(node)) => items.push(Item::Value(node)),
                _ => {}
            }
        }
        Ok(ChunkResult::from_node(result, Some(items)))
    }

    async fn end(&mut self) -> Result<(), Error> {
        if let Some(client) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        }
        if let Some(mut instance) = self.instance.take() {
            instance
                .stop()
                .await
                .map_err(|e| Error::Session(format!("stopping the session: {e}")))?;
        }
        Ok(())
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A session on a remote Sparkla server.
pub struct Remote {
    url: String,
    token: Option<String>,
    environment: Option<String>,
    ws: Option<Ws>,
    session: Option<Value>,
    next: u64,
}

impl Remote {
    pub fn new(url: impl Into<String>, token: Option<String>, environment: Option<String>) -> Self {
        Remote {
            url: url.into(),
            token,
            environment,
            ws: None,
            session: None,
            next: 1,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value, Error> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Session("not connected".into()))?;
        let id = self.next;
        self.next += 1;
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        ws.send(Message::Text(msg.to_string().into()))
            .await
            .map_err(|e| Error::Session(format!("sending {method}: {e}")))?;
        loop {
            let m = match ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(Error::Session(format!("{method}: {e}"))),
                None => {
                    return Err(Error::Session(format!(
                        "{method}: the server closed the connection"
                    )))
                }
            };
            let text = match m {
                Message::Text(t) => t.to_string(),
                Message::Close(frame) => {
                    let why = frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default();
                    return Err(Error::Session(format!(
                        "the server closed the connection: {why}"
                    )));
                }
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::Session(format!("unreadable message from the server: {e}")))?;
            if v.get("id") == Some(&json!(id)) {
                if let Some(e) = v.get("error") {
                    return Err(Error::Session(format!(
                        "{method}: {}",
                        e.get("message").and_then(Value::as_str).unwrap_or("error")
                    )));
                }
                return Ok(v.get("result").cloned().unwrap_or(Value::Null));
            }
            if let Some(level) = v.get("method").and_then(Value::as_str) {
                let message = v
                    .pointer("/params/message")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                tracing::info!(level, message, "notification from the server");
            }
        }
    }
}

#[async_trait]
impl Executor for Remote {
    async fn begin(&mut self) -> Result<SessionInfo, Error> {
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Usage(format!("--server {}: {e}", self.url)))?;
        let client = format!("sparkla-execute-{}", std::process::id());
        let proto = match &self.token {
            Some(t) => format!("executa.stenci.la+1+{client}+{t}"),
            None => format!("executa.stenci.la+1+{client}"),
        };
        let header = |s: String| {
            s.parse()
                .map_err(|_| Error::Usage("the token is not a valid header value".into()))
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", header(proto)?);
        if let Some(t) = &self.token {
            req.headers_mut()
                .insert("Authorization", header(format!("Bearer {t}"))?);
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| Error::Session(format!("cannot connect to {}: {e}", self.url)))?;
        self.ws = Some(ws);
        let mut node = json!({"type": "SoftwareSession"});
        if let Some(env) = &self.environment {
            node["environment"] = json!({"type": "SoftwareEnvironment", "name": env});
        }
        let session = self.call("begin", json!({ "node": node })).await?;
        if session.get("status").and_then(Value::as_str) != Some("started") {
            return Err(Error::Session(format!(
                "the server did not start a session: {}",
                session
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            )));
        }
        let environment = json!({
            "server": self.url,
            "environment": session.get("environment").cloned().unwrap_or(Value::Null),
        });
        self.session = Some(session);
        Ok(SessionInfo {
            runtime: "remote".into(),
            environment,
        })
    }

    async fn execute(&mut self, _job: &str, node: Value) -> Result<ChunkResult, Error> {
        let session = self
            .session
            .clone()
            .ok_or_else(|| Error::Session("no session".into()))?;
        let result = self
            .call("execute", json!({"node": node, "session": session}))
            .await?;
        Ok(ChunkResult::from_node(result, None))
    }

    async fn end(&mut self) -> Result<(), Error> {
        if let Some(session) = self.session.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                self.call("end", json!({ "node": session })),
            )
            .await;
        }
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
        }
        Ok(())
    }
}

/// Host uid window of `sparkla execute` sessions: `EXECUTE_ID_SLOTS` ranges of 65536 ids.
pub const EXECUTE_ID_BASE: u32 = 400_000_000;
pub const EXECUTE_ID_SLOTS: u32 = 4096;

/// Remove the sessions of `sparkla execute` processes that died without ending them (killed
/// with SIGKILL, crashed): their cgroups are named `execute-<pid>-…` after the process that
/// started them. Sessions of live processes (other `sparkla execute` runs) are left alone.
pub fn reclaim_orphans(cgroups: &sparkla_runtime::cgroup::Cgroups) -> usize {
    let mut n = 0;
    for name in cgroups.children() {
        let Some(pid) = name
            .strip_prefix("execute-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match cgroups.open(&name).remove(Duration::from_secs(5)) {
            Ok(()) => {
                tracing::info!(session = %name, "reclaimed the session of a dead sparkla execute");
                n += 1;
            }
            Err(e) => {
                tracing::warn!(session = %name, error = %e, "cannot reclaim an orphaned session")
            }
        }
    }
    n
}

/// The runtime of the given name (`sandbox`, `docker`, `process`), using `agent` as the agent
/// binary when given. Unlike a server, this sweeps nothing: a server on the same host keeps
/// its sessions.
pub async fn runtime_named(name: &str, agent: Option<PathBuf>) -> Result<Arc<dyn Runtime>, Error> {
    use sparkla_runtime::docker::{DockerConfig, DockerRuntime};
    use sparkla_runtime::process::ProcessRuntime;
    use sparkla_runtime::sandbox::{SandboxConfig, SandboxRuntime};
    let unavailable = |e: sparkla_runtime::RuntimeError| {
        Error::Session(format!("cannot use the {name} runtime: {e}"))
    };
    Ok(match name {
        "sandbox" => {
            // A host uid window of its own, away from a server's (whose default window starts
            // at 100000), picked by pid so that concurrent runs are unlikely to share one.
            let slot = std::process::id() % EXECUTE_ID_SLOTS;
            let rt = SandboxRuntime::new(SandboxConfig {
                agent,
                cgroup_parent: "sparkla-execute".into(),
                state_dir: PathBuf::from("/run/sparkla/execute"),
                host_id_base: EXECUTE_ID_BASE + slot * 65_536,
                id_count: 65_536,
                id_slots: 1,
                ..Default::default()
            })
            .map_err(unavailable)?;
            reclaim_orphans(rt.cgroups());
            Arc::new(rt)
        }
        "docker" => {
            let mut dc = DockerConfig::new(format!("execute-{}", std::process::id()));
            dc.agent = agent;
            Arc::new(DockerRuntime::new(dc).await.map_err(unavailable)?)
        }
        "process" => {
            tracing::warn!(
                "the process runtime does not isolate: use it only for trusted documents"
            );
            Arc::new(ProcessRuntime::new(agent).map_err(unavailable)?)
        }
        other => {
            return Err(Error::Usage(format!(
                "unknown runtime {other:?} (use sandbox, docker or process)"
            )))
        }
    })
}
