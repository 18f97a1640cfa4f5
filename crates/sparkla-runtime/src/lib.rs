//! Session runtimes: where a session's agent runs, and how the host talks to it.
//!
//! A [`Runtime`] prepares environments and starts [`Instance`]s. An instance is one running
//! session: its isolation (namespaces, container or VM), its limits, and a byte stream to the
//! `sparkla-agent` inside it. [`AgentClient`] speaks the agent protocol
//! (`sparkla_protocol::agent`) over that stream, the same way on every runtime.
//!
//! This crate knows nothing of WebSocket, HTTP, JSON-RPC framing towards clients or JWT.

pub mod agent_client;
pub mod cgroup;
pub mod docker;
pub mod process;
pub mod sandbox;
pub mod vm;

pub use agent_client::{AgentClient, AgentError};
pub use sandbox::pool::{Pool, PoolConfig};
pub use sandbox::validate_mounts;

use async_trait::async_trait;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// The resources a session may use. `None` means "no limit beyond the runtime's default".
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// CPU quota in cores (e.g. 0.25 = a quarter of one core).
    pub cpu_cores: Option<f64>,
    /// Memory in bytes (swap is never added on top).
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes/threads.
    pub pids: Option<u64>,
    /// Size of the writable scratch space (home, /tmp) in bytes.
    pub scratch_bytes: Option<u64>,
}

/// A host directory to mount into the session. Already validated against the allow-list.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
}

/// Everything a runtime needs to start one session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstanceSpec {
    /// The session's id (used to name cgroups, containers, VM homes; and in logs).
    pub session_id: String,
    /// `environment.name` of the session; `None` for the runtime's default environment.
    pub environment: Option<String>,
    pub limits: Limits,
    /// Outbound network allowed (the default is none: only loopback inside).
    pub network: bool,
    pub mounts: Vec<Mount>,
    /// Extra environment variables for the agent and its kernels.
    pub env: Vec<(String, String)>,
}

/// How an instance is doing, as far as the runtime can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Running,
    /// The instance ended; `reason` says how (exit status, signal, container state).
    Exited {
        reason: String,
    },
}

/// What a sweep of leftovers reclaimed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepReport {
    pub processes: usize,
    pub cgroups: usize,
    pub mounts: usize,
    pub containers: usize,
    pub directories: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot work on this host (e.g. Docker unreachable, no user namespaces).
    #[error("{runtime} runtime is unavailable: {reason}")]
    Unavailable {
        runtime: &'static str,
        reason: String,
    },
    /// The session's environment does not exist or cannot be used.
    #[error("environment {name:?} is not available: {reason}")]
    Environment { name: String, reason: String },
    /// The session asked for something it may not have (e.g. a mount outside the allow-list).
    #[error("{0}")]
    Refused(String),
    /// Starting the instance failed.
    #[error("failed to start session {session_id}: {reason}")]
    Start { session_id: String, reason: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A runtime: a way to run sessions (the built-in sandbox, Docker, Firecracker, ...).
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// A short name: `sandbox`, `docker`, `firecracker`, `qemu`.
    fn name(&self) -> &'static str;

    /// Check that an environment exists and make it ready to start instances quickly
    /// (e.g. check an image, build a root directory). Idempotent.
    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError>;

    /// Start an instance with the given limits and mounts. It returns once the instance is
    /// started; the agent inside may still be starting (see [`AgentClient::ready`]).
    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError>;

    /// Reclaim whatever a crashed server of this runtime left behind (processes, cgroups,
    /// containers, VM homes, temporary directories).
    async fn sweep(&self) -> Result<SweepReport, RuntimeError>;
}

/// One running session instance. Dropping it without [`Instance::stop`] must still reclaim
/// everything (best effort, synchronously); `stop` is the orderly path.
#[async_trait]
pub trait Instance: Send + Sync {
    /// The session id it was started for.
    fn session_id(&self) -> &str;

    /// Take the byte stream to the agent inside. Returns `None` after the first call.
    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)>;

    /// Whether the instance is still running, and if not, why.
    async fn state(&self) -> InstanceState;

    /// How many times the kernel's OOM killer acted inside this instance so far.
    async fn oom_kills(&self) -> u64;

    /// Change the cpu, memory and pids limits of the running instance (not scratch size).
    /// `Ok(false)` if this runtime cannot (the default); used by [`Pool`] to hand out warm
    /// instances to sessions with their own limits.
    async fn set_limits(&self, _limits: &Limits) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Kill everything in the instance and reclaim every resource it took.
    async fn stop(&mut self) -> Result<(), RuntimeError>;
}

/// Find a sibling binary of the current executable (also one level up, for `deps/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}
