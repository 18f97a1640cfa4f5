//! The session manager: sessions, their lifecycle, their clients, and the resources they hold.
//!
//! It knows nothing of transport. The edge registers each connected client with
//! [`SessionManager::connect`] (giving a channel for its notifications), calls the typed
//! commands ([`begin`](SessionManager::begin), [`execute`](SessionManager::execute),
//! [`end`](SessionManager::end), [`cancel`](SessionManager::cancel)) on its behalf, and calls
//! [`disconnect`](SessionManager::disconnect) when it goes. Clients that are not registered
//! (plain HTTP requests) may use every command; they receive no notifications and their
//! sessions are not ended on disconnect (only by expiry or `end`).
//!
//! Lifecycle of a session: `starting → started → stopping → stopped`, or `failed` from
//! `starting`/`started`. Every command checks the status it needs.

pub mod effective;
pub mod names;

use serde_json::{json, Map, Value};
use sparkla_protocol::nodes::node_type;
use sparkla_protocol::{CodeError, SessionStatus, SoftwareSession};
use sparkla_runtime::sandbox::pool::start_ready;
use sparkla_runtime::{
    validate_mounts, AgentClient, AgentError, Instance, InstanceSpec, Limits, Mount, Pool, Runtime,
    RuntimeError,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::config::{secs, Config};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What the manager needs from the configuration.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub cpu_total: f64,
    pub memory_total: f64,
    pub expiry_interval: Duration,
    pub duration_warning: Duration,
    pub timeout_warning: Duration,
    pub stale_interval: Duration,
    pub stale_period: Duration,
    pub session_defaults: Map<String, Value>,
    pub mount_allow: Vec<PathBuf>,
    pub allow_network: bool,
    pub start_timeout: Duration,
    pub max_restarts: u32,
    pub max_starting: usize,
}

impl From<&Config> for ManagerConfig {
    fn from(c: &Config) -> Self {
        Self {
            cpu_total: c.cpu_total,
            memory_total: c.memory_total,
            expiry_interval: secs(c.expiry_interval),
            duration_warning: secs(c.duration_warning),
            timeout_warning: secs(c.timeout_warning),
            stale_interval: secs(c.stale_interval),
            stale_period: secs(c.stale_period),
            session_defaults: c.session_defaults.clone(),
            mount_allow: c.mount_allow.clone(),
            allow_network: c.allow_network,
            start_timeout: secs(c.start_timeout),
            max_restarts: c.max_restarts,
            max_starting: c.max_starting,
        }
    }
}

impl Default for ManagerConfig {
    fn default() -> Self {
        (&Config::default()).into()
    }
}

/// The level of a notification (the edge uses it as the JSON-RPC method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// A message for a client about one of its sessions (or the server).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub level: Level,
    pub message: String,
    pub node: Option<Value>,
}

/// Who is asking: a connection (registered) or an HTTP request (not registered).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientInfo {
    /// Unique per connection; for HTTP requests, derived from the token.
    pub id: String,
    /// The token said `admin: true`.
    pub admin: bool,
    /// The token's `session` claim: spread over every session this client begins.
    pub session_claims: Option<Map<String, Value>>,
}

/// A command failed as a whole (failures inside a session come back in the node instead).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManagerError {
    /// Maps to JSON-RPC -32602.
    #[error("{0}")]
    InvalidParams(String),
    /// Maps to JSON-RPC -32005.
    #[error("{0}")]
    Capability(String),
    /// Maps to JSON-RPC -32000.
    #[error("{0}")]
    Server(String),
}

impl ManagerError {
    pub fn code(&self) -> i64 {
        use sparkla_protocol::ErrorCode;
        match self {
            Self::InvalidParams(_) => ErrorCode::INVALID_PARAMS,
            Self::Capability(_) => ErrorCode::CAPABILITY_ERROR,
            Self::Server(_) => ErrorCode::SERVER_ERROR,
        }
    }
}

pub const INSUFFICIENT_RESOURCES: &str = "Insufficient resources available to begin session";
pub const MAX_CLIENTS: &str = "Maximum number of clients already using this session";
pub const NO_LONGER_AVAILABLE: &str = "Session is no longer available.";
pub const RESTARTING: &str = "Session failed and will be restarted";

struct State {
    status: SessionStatus,
    node: SoftwareSession,
    clients: HashSet<String>,
    agent: Option<Arc<AgentClient>>,
    started_at: Instant,
    last_activity: Instant,
    running: usize,
    warned_duration: bool,
    warned_timeout: bool,
    ended_at: Option<Instant>,
    /// cpu, memory held against the totals (released once).
    held: Option<(f64, f64)>,
    restarts: u32,
}

struct Session {
    id: String,
    name: String,
    creator: String,
    creator_admin: bool,
    spec: InstanceSpec,
    state: Mutex<State>,
    instance: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
    /// Bumped on every (re)start so a monitor can tell its agent is no longer current.
    generation: AtomicU64,
}

impl Session {
    fn status(&self) -> SessionStatus {
        self.state.lock().expect("state").status
    }
    fn node(&self) -> Value {
        let mut v = serde_json::to_value(&self.state.lock().expect("state").node).expect("node");
        tidy_numbers(&mut v);
        v
    }
}

struct Job {
    session: String,
    agent_job: String,
    owner: String,
}

struct Client {
    tx: mpsc::Sender<Notice>,
}

#[derive(Default)]
struct Totals {
    cpu: f64,
    memory: f64,
}

struct Inner {
    runtime: Arc<dyn Runtime>,
    pool: Option<Pool>,
    config: ManagerConfig,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    clients: Mutex<HashMap<String, Client>>,
    implicit: Mutex<HashMap<String, String>>,
    jobs: Mutex<HashMap<(String, String), Job>>,
    allocated: Mutex<Totals>,
    shutting_down: AtomicBool,
    job_seq: AtomicU64,
    /// Bounds instances starting at once.
    starting: tokio::sync::Semaphore,
}

/// The session manager. Cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

/// A session as listed for admins.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    pub id: String,
    pub name: String,
    pub status: SessionStatus,
    pub creator: String,
    pub clients: usize,
    pub cpu: f64,
    pub memory: f64,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub restarts: u32,
}

impl SessionManager {
    /// A manager over `runtime`. Call [`SessionManager::spawn_timers`] to run expiry.
    pub fn new(runtime: Arc<dyn Runtime>, config: ManagerConfig) -> Self {
        metrics::gauge!("sparkla_cpu_total").set(config.cpu_total);
        metrics::gauge!("sparkla_memory_total_gib").set(config.memory_total);
        Self {
            inner: Arc::new(Inner {
                runtime,
                pool: None,
                sessions: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                implicit: Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                allocated: Mutex::new(Totals::default()),
                shutting_down: AtomicBool::new(false),
                job_seq: AtomicU64::new(1),
                starting: tokio::sync::Semaphore::new(config.max_starting.max(1)),
                config,
            }),
        }
    }

    /// A manager that hands out warm instances from `pool` (over the same runtime).
    pub fn with_pool(runtime: Arc<dyn Runtime>, config: ManagerConfig, pool: Pool) -> Self {
        let mut m = Self::new(runtime, config);
        Arc::get_mut(&mut m.inner).expect("new manager").pool = Some(pool);
        m
    }

    /// Ready instances waiting in the warm pool.
    pub fn pool_idle(&self) -> usize {
        self.inner.pool.as_ref().map_or(0, Pool::idle)
    }

    pub fn runtime_name(&self) -> &'static str {
        self.inner.runtime.name()
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// Run expiry (every `expiry_interval`) and stale removal (every `stale_interval`) until
    /// the manager is dropped or shut down.
    pub fn spawn_timers(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let (expiry, stale) = (
            self.inner.config.expiry_interval,
            self.inner.config.stale_interval,
        );
        tokio::spawn(async move {
            let mut e = tokio::time::interval(expiry);
            let mut s = tokio::time::interval(stale);
            e.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            s.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let which = tokio::select! { _ = e.tick() => 0, _ = s.tick() => 1 };
                let Some(inner) = weak.upgrade() else { break };
                let m = SessionManager { inner };
                if m.inner.shutting_down.load(Ordering::SeqCst) {
                    break;
                }
                if which == 0 {
                    m.expire().await;
                } else {
                    m.remove_stale();
                }
            }
        })
    }

    /// CPU cores and memory (GiB) free for new sessions.
    pub fn free(&self) -> (f64, f64) {
        let a = self.inner.allocated.lock().expect("allocated");
        (
            (self.inner.config.cpu_total - a.cpu).max(0.0),
            (self.inner.config.memory_total - a.memory).max(0.0),
        )
    }

    // ----- clients -----

    /// Register a connected client; its notifications go to `tx`.
    pub fn connect(&self, client: &ClientInfo, tx: mpsc::Sender<Notice>) {
        self.inner
            .clients
            .lock()
            .expect("clients")
            .insert(client.id.clone(), Client { tx });
    }

    /// A client went away: it leaves its sessions; a session left with no client is ended,
    /// unless an admin began it. Its running jobs are cancelled.
    pub async fn disconnect(&self, client: &ClientInfo) {
        self.inner
            .clients
            .lock()
            .expect("clients")
            .remove(&client.id);
        self.inner
            .implicit
            .lock()
            .expect("implicit")
            .remove(&client.id);
        let jobs: Vec<(String, String)> = {
            let mut jobs = self.inner.jobs.lock().expect("jobs");
            let keys: Vec<_> = jobs.keys().filter(|k| k.0 == client.id).cloned().collect();
            keys.iter()
                .filter_map(|k| jobs.remove(k))
                .map(|j| (j.session, j.agent_job))
                .collect()
        };
        for (session, agent_job) in jobs {
            if let Some(agent) = self
                .get(&session)
                .and_then(|s| s.state.lock().expect("state").agent.clone())
            {
                let _ = agent.cancel(&agent_job).await;
            }
        }
        let sessions: Vec<Arc<Session>> = self.all();
        let mut to_end = Vec::new();
        for s in sessions {
            let mut st = s.state.lock().expect("state");
            if st.clients.remove(&client.id)
                && st.clients.is_empty()
                && !s.creator_admin
                && matches!(st.status, SessionStatus::Starting | SessionStatus::Started)
            {
                to_end.push(s.clone());
            }
        }
        for s in to_end {
            tracing::info!(session_id = %s.id, client = %client.id, "last client disconnected: ending session");
            self.stop(&s, Some("Client disconnected."), SessionStatus::Stopped)
                .await;
        }
    }

    fn notify_client(&self, client: &str, notice: Notice) {
        let tx = self
            .inner
            .clients
            .lock()
            .expect("clients")
            .get(client)
            .map(|c| c.tx.clone());
        if let Some(tx) = tx {
            if tx.try_send(notice).is_err() {
                tracing::debug!(client, "notification dropped (client slow or gone)");
            }
        }
    }

    fn notify_session(&self, s: &Session, level: Level, message: String) {
        let (clients, node) = {
            let st = s.state.lock().expect("state");
            (
                st.clients.iter().cloned().collect::<Vec<_>>(),
                serde_json::to_value(&st.node).ok(),
            )
        };
        for c in clients {
            self.notify_client(
                &c,
                Notice {
                    level,
                    message: message.clone(),
                    node: node.clone(),
                },
            );
        }
    }

    // ----- lookup -----

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .get(id)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .values()
            .cloned()
            .collect()
    }

    /// The current node of a session.
    pub fn session(&self, id: &str) -> Option<Value> {
        self.get(id).map(|s| s.node())
    }

    /// Every session, for admins.
    pub fn list(&self) -> Vec<SessionSummary> {
        let mut v: Vec<SessionSummary> = self
            .all()
            .iter()
            .map(|s| {
                let st = s.state.lock().expect("state");
                let (cpu, memory) = st.held.unwrap_or((0.0, 0.0));
                SessionSummary {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    status: st.status,
                    creator: s.creator.clone(),
                    clients: st.clients.len(),
                    cpu,
                    memory,
                    age_seconds: st.started_at.elapsed().as_secs_f64(),
                    idle_seconds: st.last_activity.elapsed().as_secs_f64(),
                    restarts: st.restarts,
                }
            })
            .collect();
        v.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        v
    }

    /// Set the gauges that are cheaper to compute when scraped: sessions by status, clients,
    /// resources allocated.
    pub fn refresh_gauges(&self) {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for s in self.all() {
            *counts.entry(s.status().as_str()).or_default() += 1;
        }
        let runtime = self.inner.runtime.name();
        for status in ["starting", "started", "stopping", "stopped", "failed"] {
            metrics::gauge!("sparkla_sessions", "status" => status, "runtime" => runtime)
                .set(counts.get(status).copied().unwrap_or(0) as f64);
        }
        let a = self.inner.allocated.lock().expect("allocated");
        metrics::gauge!("sparkla_cpu_allocated").set(a.cpu);
        metrics::gauge!("sparkla_memory_allocated_gib").set(a.memory);
        metrics::gauge!("sparkla_clients")
            .set(self.inner.clients.lock().expect("clients").len() as f64);
    }

    // ----- begin -----

    /// Begin a session. A node that is not a SoftwareSession, or already has `dateStart`,
    /// comes back unchanged. Refusals of resources come back as a `failed` session.
    pub async fn begin(&self, client: &ClientInfo, node: Value) -> Result<Value, ManagerError> {
        if node_type(&node) != Some("SoftwareSession") || node.get("dateStart").is_some() {
            return Ok(node);
        }
        let t0 = Instant::now();
        let s = self.begin_session(client, node).await?;
        let out = s.node();
        metrics::histogram!("sparkla_begin_seconds").record(t0.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn begin_session(
        &self,
        client: &ClientInfo,
        node: Value,
    ) -> Result<Arc<Session>, ManagerError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(ManagerError::Server("Server is shutting down".into()));
        }
        let requested = match node {
            Value::Object(m) => m,
            _ => {
                return Err(ManagerError::InvalidParams(
                    "\"node\" must be an object".into(),
                ))
            }
        };
        let mut session = effective::effective(
            &self.inner.config.session_defaults,
            &requested,
            client.session_claims.as_ref(),
        )
        .map_err(|e| ManagerError::InvalidParams(format!("\"node\" {e}")))?;

        // Unguessable ids: a requested id is replaced (the id is the capability to join).
        let id = names::session_id();
        session.id = Some(id.clone());
        let name = session
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(names::session_name);
        session.name = Some(name.clone());

        let mounts = self.validate_mounts(&session)?;
        let cpu = effective::capped(session.cpu_request, session.cpu_limit).unwrap_or(1.0);
        let memory = effective::capped(session.memory_request, session.memory_limit).unwrap_or(1.0);
        let network = self.inner.config.allow_network
            && effective::capped(
                session.network_transfer_request,
                session.network_transfer_limit,
            )
            .is_some_and(|n| n > 0.0);

        // Reserve resources, or refuse.
        let reserved = {
            let mut a = self.inner.allocated.lock().expect("allocated");
            let c = &self.inner.config;
            if a.cpu + cpu > c.cpu_total + 1e-9 || a.memory + memory > c.memory_total + 1e-9 {
                false
            } else {
                a.cpu += cpu;
                a.memory += memory;
                true
            }
        };
        let now = Instant::now();
        if !reserved {
            session.status = Some(SessionStatus::Failed);
            session.description = Some(INSUFFICIENT_RESOURCES.into());
            metrics::counter!("sparkla_begin_refused_total", "reason" => "resources").increment(1);
            tracing::info!(session_id = %id, cpu, memory, "{INSUFFICIENT_RESOURCES}");
            // Not kept: there is nothing to join or end.
            return Ok(Arc::new(Session {
                id: id.clone(),
                name,
                creator: client.id.clone(),
                creator_admin: client.admin,
                spec: InstanceSpec::default(),
                state: Mutex::new(new_state(session, now, None)),
                instance: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
            }));
        }

        let spec = InstanceSpec {
            session_id: id.clone(),
            environment: session
                .environment
                .as_ref()
                .map(|e| e.name.clone())
                .filter(|n| !n.is_empty()),
            limits: Limits {
                cpu_cores: Some(cpu),
                memory_bytes: Some((memory * GIB) as u64),
                pids: None,
                scratch_bytes: None,
            },
            network,
            mounts,
            env: Vec::new(),
        };
        session.status = Some(SessionStatus::Starting);
        let mut state = new_state(session, now, Some((cpu, memory)));
        if self.is_registered(&client.id) {
            state.clients.insert(client.id.clone());
        }
        let s = Arc::new(Session {
            id: id.clone(),
            name,
            creator: client.id.clone(),
            creator_admin: client.admin,
            spec,
            state: Mutex::new(state),
            instance: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        });
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .insert(id.clone(), s.clone());
        metrics::counter!("sparkla_sessions_begun_total", "runtime" => self.inner.runtime.name())
            .increment(1);

        match self.start_instance(&s).await {
            Ok(()) => {
                let mut st = s.state.lock().expect("state");
                if st.status == SessionStatus::Starting {
                    st.status = SessionStatus::Started;
                    st.node.status = Some(SessionStatus::Started);
                    st.node.date_start = Some(json!({"type": "Date", "value": names::iso_now()}));
                    st.started_at = Instant::now();
                    st.last_activity = st.started_at;
                }
                tracing::info!(session_id = %id, name = %s.name, client = %client.id, "session started");
            }
            Err(reason) => {
                tracing::warn!(session_id = %id, %reason, "session failed to start");
                self.stop(&s, None, SessionStatus::Failed).await;
                let mut st = s.state.lock().expect("state");
                st.node.description = Some(format!("Session failed to start: {reason}"));
            }
        }
        Ok(s)
    }

    fn is_registered(&self, client: &str) -> bool {
        self.inner
            .clients
            .lock()
            .expect("clients")
            .contains_key(client)
    }

    fn validate_mounts(&self, session: &SoftwareSession) -> Result<Vec<Mount>, ManagerError> {
        let mut requested = Vec::new();
        for m in session.volume_mounts.as_deref().unwrap_or_default() {
            let Some(source) = m.mount_source.as_deref() else {
                return Err(ManagerError::Capability(format!(
                    "Volume mount to {:?} has no mountSource",
                    m.mount_destination
                )));
            };
            requested.push(Mount {
                source: source.into(),
                destination: m.mount_destination.clone().into(),
                read_only: m.read_only(),
            });
        }
        validate_mounts(&requested, &self.inner.config.mount_allow).map_err(|e| match e {
            RuntimeError::Refused(msg) => ManagerError::Capability(msg),
            other => ManagerError::InvalidParams(other.to_string()),
        })
    }

    /// Start (or restart) the session's instance and wait for its agent.
    async fn start_instance(&self, s: &Arc<Session>) -> Result<(), String> {
        let mut slot = s.instance.lock().await;
        if let Some(mut old) = slot.take() {
            let _ = old.stop().await;
        }
        let _permit = self
            .inner
            .starting
            .acquire()
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        let started = match &self.inner.pool {
            Some(pool) => pool.begin(s.spec.clone()).await,
            None => {
                start_ready(
                    self.inner.runtime.as_ref(),
                    s.spec.clone(),
                    self.inner.config.start_timeout,
                )
                .await
            }
        };
        let (instance, agent) = started.map_err(|e| e.to_string())?;
        let agent = Arc::new(agent);
        *slot = Some(instance);
        drop(slot);
        let generation = s.generation.fetch_add(1, Ordering::SeqCst) + 1;
        s.state.lock().expect("state").agent = Some(agent.clone());
        // Watch the agent: if it dies while the session is started, restart or fail.
        let weak = Arc::downgrade(&self.inner);
        let session = s.clone();
        tokio::spawn(async move {
            let reason = agent.closed().await;
            drop(agent);
            let Some(inner) = weak.upgrade() else { return };
            let m = SessionManager { inner };
            if session.generation.load(Ordering::SeqCst) == generation
                && session.status() == SessionStatus::Started
            {
                m.agent_died(&session, reason).await;
            }
        });
        Ok(())
    }

    /// Boxed: it restarts the instance, whose monitor may call it again.
    fn agent_died<'a>(
        &'a self,
        s: &'a Arc<Session>,
        reason: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let restarts = {
                let mut st = s.state.lock().expect("state");
                st.agent = None;
                st.restarts += 1;
                st.restarts
            };
            tracing::warn!(session_id = %s.id, %reason, restarts, "session agent died");
            if restarts <= self.inner.config.max_restarts
                && !self.inner.shutting_down.load(Ordering::SeqCst)
            {
                self.notify_session(s, Level::Warn, RESTARTING.to_string());
                metrics::counter!("sparkla_session_restarts_total").increment(1);
                match self.start_instance(s).await {
                    Ok(()) => {
                        self.notify_session(
                            s,
                            Level::Info,
                            "Session restarted (its previous state, such as variables, is lost)."
                                .into(),
                        );
                        return;
                    }
                    Err(e) => {
                        let msg = format!("Session failed: could not restart it: {e}");
                        self.fail(s, msg).await;
                        return;
                    }
                }
            }
            self.fail(
                s,
                format!("Session failed: its agent died {restarts} times (last: {reason})"),
            )
            .await;
        })
    }

    async fn fail(&self, s: &Arc<Session>, description: String) {
        tracing::warn!(session_id = %s.id, %description, "session failed");
        s.state.lock().expect("state").node.description = Some(description.clone());
        self.notify_session(s, Level::Error, description);
        self.stop(s, None, SessionStatus::Failed).await;
    }

    // ----- end -----

    /// End a session: only its creator or an admin may. A session that is not active comes
    /// back as it is.
    pub async fn end(&self, client: &ClientInfo, node: Value) -> Result<Value, ManagerError> {
        if node_type(&node) != Some("SoftwareSession") {
            return Ok(node);
        }
        if let Some(status) = node.get("status").and_then(Value::as_str) {
            if !matches!(status, "starting" | "started") {
                return Ok(node);
            }
        }
        let id = node.get("id").and_then(Value::as_str).ok_or_else(|| {
            ManagerError::InvalidParams("\"node\" is a SoftwareSession without an \"id\"".into())
        })?;
        let s = self
            .get(id)
            .ok_or_else(|| ManagerError::InvalidParams(format!("Session id is invalid: {id}")))?;
        if s.creator != client.id && !client.admin {
            return Err(ManagerError::Capability(
                "Only the client that began a session (or an admin) may end it".into(),
            ));
        }
        let t0 = Instant::now();
        self.stop(&s, None, SessionStatus::Stopped).await;
        metrics::histogram!("sparkla_end_seconds").record(t0.elapsed().as_secs_f64());
        Ok(s.node())
    }

    /// Stop a session (ending it with `info` "Ending session ..." when it ends as
    /// `stopped`), reclaim its instance and release its resources. Idempotent.
    async fn stop(&self, s: &Arc<Session>, reason: Option<&str>, final_status: SessionStatus) {
        let agent = {
            let mut st = s.state.lock().expect("state");
            if !matches!(st.status, SessionStatus::Starting | SessionStatus::Started) {
                return;
            }
            st.status = SessionStatus::Stopping;
            st.node.status = Some(SessionStatus::Stopping);
            if let (Some(r), None) = (reason, &st.node.description) {
                st.node.description = Some(r.to_string());
            }
            st.agent.take()
        };
        s.generation.fetch_add(1, Ordering::SeqCst);
        if final_status == SessionStatus::Stopped {
            let msg = match reason {
                Some(r) => format!("Ending session \"{}\". {r}", s.name),
                None => format!("Ending session \"{}\".", s.name),
            };
            self.notify_session(s, Level::Info, msg);
        }
        if let Some(agent) = agent {
            let _ = tokio::time::timeout(Duration::from_secs(2), agent.shutdown()).await;
        }
        let stopped = {
            let mut slot = s.instance.lock().await;
            match slot.take() {
                Some(mut i) => i.stop().await,
                None => Ok(()),
            }
        };
        if let Err(e) = stopped {
            tracing::error!(session_id = %s.id, error = %e, "reclaiming session instance failed");
        }
        self.inner
            .jobs
            .lock()
            .expect("jobs")
            .retain(|_, j| j.session != s.id);
        let held = {
            let mut st = s.state.lock().expect("state");
            st.status = final_status;
            st.node.status = Some(final_status);
            st.node.date_end = Some(json!({"type": "Date", "value": names::iso_now()}));
            st.ended_at = Some(Instant::now());
            st.held.take()
        };
        if let Some((cpu, memory)) = held {
            let mut a = self.inner.allocated.lock().expect("allocated");
            a.cpu = (a.cpu - cpu).max(0.0);
            a.memory = (a.memory - memory).max(0.0);
        }
        tracing::info!(session_id = %s.id, status = final_status.as_str(), "session ended");
    }

    // ----- execute -----

    /// Execute a CodeChunk or CodeExpression (other nodes come back unchanged) in the given
    /// session, or in this client's implicit session. Failures come back in `errors`.
    pub async fn execute(
        &self,
        client: &ClientInfo,
        node: Value,
        session: Option<Value>,
        job: Option<String>,
    ) -> Result<Value, ManagerError> {
        if !matches!(node_type(&node), Some("CodeChunk" | "CodeExpression")) {
            return Ok(node);
        }
        let t0 = Instant::now();
        let s = match session {
            Some(session) => {
                let id = match session.get("id") {
                    Some(Value::String(id)) => id.clone(),
                    Some(other) => other.to_string(),
                    None => "undefined".into(),
                };
                if !names::is_session_id(&id) {
                    return Ok(with_error(node, format!("Session id is invalid: {id}")));
                }
                match self.get(&id) {
                    Some(s) => s,
                    None => return Ok(with_error(node, NO_LONGER_AVAILABLE.into())),
                }
            }
            None => self.implicit_session(client).await?,
        };
        let agent = {
            let mut st = s.state.lock().expect("state");
            if st.status != SessionStatus::Started {
                let why = st.node.description.clone().unwrap_or_default();
                return Ok(with_error(
                    node,
                    format!("Session is inactive. {why}").trim_end().to_string(),
                ));
            }
            if self.is_registered(&client.id) && !st.clients.contains(&client.id) {
                let max = effective::capped(st.node.clients_request, st.node.clients_limit);
                if max.is_some_and(|m| st.clients.len() as f64 >= m) {
                    return Ok(with_error(node, MAX_CLIENTS.into()));
                }
                st.clients.insert(client.id.clone());
            }
            st.last_activity = Instant::now();
            st.warned_timeout = false;
            st.running += 1;
            st.agent.clone()
        };
        let result = match agent {
            None => Ok(with_error(node, NO_LONGER_AVAILABLE.into())),
            Some(agent) => {
                let agent_job = format!("j{}", self.inner.job_seq.fetch_add(1, Ordering::Relaxed));
                let key = job.map(|j| (client.id.clone(), j));
                if let Some(key) = &key {
                    let mut jobs = self.inner.jobs.lock().expect("jobs");
                    if jobs.contains_key(key) {
                        drop(jobs);
                        s.state.lock().expect("state").running -= 1;
                        return Err(ManagerError::InvalidParams(format!(
                            "job {:?} is already running",
                            key.1
                        )));
                    }
                    jobs.insert(
                        key.clone(),
                        Job {
                            session: s.id.clone(),
                            agent_job: agent_job.clone(),
                            owner: client.id.clone(),
                        },
                    );
                }
                let r = agent.execute(&agent_job, node.clone(), None).await;
                if let Some(key) = &key {
                    self.inner.jobs.lock().expect("jobs").remove(key);
                }
                Ok(match r {
                    Ok(v) => v,
                    Err(AgentError::Closed(reason)) => with_error(
                        node,
                        format!("{NO_LONGER_AVAILABLE} The session's agent stopped: {reason}"),
                    ),
                    Err(e) => with_error(node, e.to_string()),
                })
            }
        };
        {
            let mut st = s.state.lock().expect("state");
            st.running = st.running.saturating_sub(1);
            st.last_activity = Instant::now();
        }
        metrics::histogram!("sparkla_execute_seconds").record(t0.elapsed().as_secs_f64());
        result
    }

    async fn implicit_session(&self, client: &ClientInfo) -> Result<Arc<Session>, ManagerError> {
        let existing = self
            .inner
            .implicit
            .lock()
            .expect("implicit")
            .get(&client.id)
            .cloned();
        if let Some(s) = existing.and_then(|id| self.get(&id)) {
            if s.status() == SessionStatus::Started {
                return Ok(s);
            }
        }
        let s = self
            .begin_session(client, json!({"type": "SoftwareSession"}))
            .await?;
        if s.status() == SessionStatus::Started {
            self.inner
                .implicit
                .lock()
                .expect("implicit")
                .insert(client.id.clone(), s.id.clone());
        }
        Ok(s)
    }

    // ----- cancel -----

    /// Cancel this client's job: `true` if it was running (it then returns with a
    /// cancellation error), `false` if there was no such job.
    pub async fn cancel(&self, client: &ClientInfo, job: &str) -> Result<bool, ManagerError> {
        let found = {
            let jobs = self.inner.jobs.lock().expect("jobs");
            jobs.get(&(client.id.clone(), job.to_string()))
                .map(|j| (j.session.clone(), j.agent_job.clone(), j.owner.clone()))
        };
        let Some((session, agent_job, _owner)) = found else {
            return Ok(false);
        };
        let agent = self
            .get(&session)
            .and_then(|s| s.state.lock().expect("state").agent.clone());
        match agent {
            Some(agent) => agent
                .cancel(&agent_job)
                .await
                .map_err(|e| ManagerError::Server(e.to_string())),
            None => Ok(false),
        }
    }

    // ----- expiry -----

    /// End sessions past their duration or idle timeout; warn those close to either.
    pub async fn expire(&self) {
        let c = &self.inner.config;
        let mut to_end = Vec::new();
        let mut warnings = Vec::new();
        for s in self.all() {
            let mut st = s.state.lock().expect("state");
            if st.status != SessionStatus::Started {
                continue;
            }
            if st.running > 0 {
                st.last_activity = Instant::now();
            }
            if let Some(d) = effective::capped(st.node.duration_request, st.node.duration_limit) {
                let elapsed = st.started_at.elapsed().as_secs_f64();
                if elapsed >= d {
                    to_end.push((
                        s.clone(),
                        format!("Reached maximum duration of {} seconds", fmt_num(d)),
                    ));
                    continue;
                }
                if !st.warned_duration && d - elapsed <= c.duration_warning.as_secs_f64() {
                    st.warned_duration = true;
                    warnings.push((
                        s.clone(),
                        format!(
                            "Session will reach maximum duration in {} minutes",
                            minutes(d - elapsed)
                        ),
                    ));
                }
            }
            if let Some(t) = effective::capped(st.node.timeout_request, st.node.timeout_limit) {
                let idle = st.last_activity.elapsed().as_secs_f64();
                if idle >= t {
                    to_end.push((
                        s.clone(),
                        format!("No activity over {} seconds", fmt_num(t)),
                    ));
                    continue;
                }
                if !st.warned_timeout && t - idle <= c.timeout_warning.as_secs_f64() {
                    st.warned_timeout = true;
                    warnings.push((
                        s.clone(),
                        format!(
                            "Session will end due to inactivity in {} minutes",
                            minutes(t - idle)
                        ),
                    ));
                }
            }
        }
        for (s, msg) in warnings {
            self.notify_session(&s, Level::Warn, msg);
        }
        for (s, reason) in to_end {
            tracing::info!(session_id = %s.id, %reason, "session expired");
            self.stop(&s, Some(&reason), SessionStatus::Stopped).await;
        }
    }

    /// Forget sessions stopped or failed more than `stale_period` ago.
    pub fn remove_stale(&self) {
        let period = self.inner.config.stale_period;
        let mut removed = Vec::new();
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .retain(|id, s| {
                let st = s.state.lock().expect("state");
                let stale = matches!(st.status, SessionStatus::Stopped | SessionStatus::Failed)
                    && st.ended_at.is_some_and(|t| t.elapsed() >= period);
                if stale {
                    removed.push(id.clone());
                }
                !stale
            });
        if !removed.is_empty() {
            let mut implicit = self.inner.implicit.lock().expect("implicit");
            implicit.retain(|_, sid| !removed.contains(sid));
            tracing::debug!(count = removed.len(), "removed stale sessions");
        }
    }

    // ----- shutdown -----

    /// Refuse new sessions, tell every client, end every session and reclaim everything.
    pub async fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let clients: Vec<String> = self
            .inner
            .clients
            .lock()
            .expect("clients")
            .keys()
            .cloned()
            .collect();
        for c in clients {
            self.notify_client(
                &c,
                Notice {
                    level: Level::Info,
                    message: "Server is shutting down.".into(),
                    node: None,
                },
            );
        }
        let sessions = self.all();
        tracing::info!(count = sessions.len(), "ending all sessions");
        let mut set = tokio::task::JoinSet::new();
        for s in sessions {
            let m = self.clone();
            set.spawn(async move {
                m.stop(&s, Some("Server is shutting down."), SessionStatus::Stopped)
                    .await
            });
        }
        while set.join_next().await.is_some() {}
        if let Some(pool) = &self.inner.pool {
            pool.shutdown().await;
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}

fn new_state(node: SoftwareSession, now: Instant, held: Option<(f64, f64)>) -> State {
    State {
        status: node.status.unwrap_or_default(),
        node,
        clients: HashSet::new(),
        agent: None,
        started_at: now,
        last_activity: now,
        running: 0,
        warned_duration: false,
        warned_timeout: false,
        ended_at: None,
        held,
        restarts: 0,
    }
}

/// Whole numbers as integers (`1`, not `1.0`), as JavaScript clients wrote them.
fn tidy_numbers(v: &mut Value) {
    if let Some(obj) = v.as_object_mut() {
        for (req, lim) in effective::PAIRS {
            for key in [req, lim] {
                if let Some(n) = obj.get(*key).and_then(Value::as_f64) {
                    if n.fract() == 0.0 && n.abs() < 9e15 {
                        obj.insert(key.to_string(), Value::from(n as i64));
                    }
                }
            }
        }
    }
}

/// Append a session error to a node's `errors`.
fn with_error(mut node: Value, message: String) -> Value {
    let err = serde_json::to_value(CodeError::new("SessionError", message)).expect("error");
    if let Some(obj) = node.as_object_mut() {
        match obj.get_mut("errors") {
            Some(Value::Array(list)) => list.push(err),
            _ => {
                obj.insert("errors".into(), Value::Array(vec![err]));
            }
        }
    }
    node
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Minutes, rounded to a tenth (so that second-scale test intervals still say something).
fn minutes(secs: f64) -> String {
    let m = (secs / 60.0 * 10.0).round() / 10.0;
    fmt_num(m)
}

#[cfg(test)]
mod tests;
