//! The server's configuration: every option, its default, and its config-file key.
//!
//! Keys are camelCase in the config file (TOML or JSON) and in `sparkla config`'s output,
//! `--kebab-case` on the command line and `SPARKLA_SCREAMING_SNAKE` in the environment.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The runtime used when none is configured.
pub const DEFAULT_RUNTIME: &str = "sandbox";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Config {
    /// Debug logging.
    pub debug: bool,
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// HS256 secret for client JWTs (also `JWT_SECRET`). None: generate one at start.
    pub jwt_secret: Option<String>,
    /// Session runtime: sandbox, docker, firecracker, qemu or process (no isolation: trusted code only).
    pub runtime: String,
    /// CPU cores available to sessions in total (default: the host's cores).
    pub cpu_total: f64,
    /// Memory available to sessions in total, GiB (default: the host's memory).
    pub memory_total: f64,
    /// Seconds between checks of session duration and inactivity.
    pub expiry_interval: f64,
    /// Seconds before the maximum duration at which clients are warned.
    pub duration_warning: f64,
    /// Seconds before the inactivity timeout at which clients are warned.
    pub timeout_warning: f64,
    /// Seconds between removals of stale (stopped or failed) sessions.
    pub stale_interval: f64,
    /// Seconds a stopped or failed session is kept so that clients can learn why.
    pub stale_period: f64,
    /// Sessions kept started ahead of demand by runtimes that support a warm pool.
    pub pool_size: usize,
    /// Maximum simultaneous WebSocket connections.
    pub max_connections: usize,
    /// Maximum size of one message (WebSocket) or request body (HTTP), bytes.
    pub max_message_size: usize,
    /// Session properties used when a client does not give them (a SoftwareSession object).
    pub session_defaults: Map<String, Value>,
    /// Host directories that sessions may mount (volumeMounts outside them are refused).
    pub mount_allow: Vec<PathBuf>,
    /// Allow sessions outbound network when they request networkTransfer.
    pub allow_network: bool,
    /// The sparkla-agent binary (default: next to the sparkla binary).
    pub agent: Option<PathBuf>,
    /// Seconds a session's agent may take to start.
    pub start_timeout: f64,
    /// Times a session whose agent dies is restarted before it fails.
    pub max_restarts: u32,
    /// Sessions starting at once; more wait their turn (so that a burst of begins queues
    /// instead of timing out together). Default: 4 per CPU.
    pub max_starting: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            debug: false,
            host: "127.0.0.1".into(),
            port: 9000,
            jwt_secret: None,
            runtime: DEFAULT_RUNTIME.into(),
            cpu_total: host_cpus(),
            memory_total: host_memory_gib(),
            expiry_interval: 15.0,
            duration_warning: 600.0,
            timeout_warning: 60.0,
            stale_interval: 60.0,
            stale_period: 3600.0,
            pool_size: 2,
            max_connections: 10_000,
            max_message_size: 16 * 1024 * 1024,
            session_defaults: default_session(),
            mount_allow: Vec::new(),
            allow_network: false,
            agent: None,
            start_timeout: 30.0,
            max_restarts: 3,
            max_starting: (host_cpus() as usize * 4).max(4),
        }
    }
}

/// The original Sparkla's session defaults.
pub fn default_session() -> Map<String, Value> {
    match json!({
        "cpuRequest": 1, "memoryRequest": 1, "durationRequest": 21600, "timeoutRequest": 3600
    }) {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// The host's logical CPUs.
pub fn host_cpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// The host's memory in GiB (from /proc/meminfo), rounded down to 1/100.
pub fn host_memory_gib() -> f64 {
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(1024.0 * 1024.0);
    (kib / 1024.0 / 1024.0 * 100.0).floor() / 100.0
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 0.0 })
}

impl Config {
    /// Check values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("cpuTotal", self.cpu_total),
            ("memoryTotal", self.memory_total),
            ("expiryInterval", self.expiry_interval),
            ("staleInterval", self.stale_interval),
            ("startTimeout", self.start_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number, not {v}"));
            }
        }
        for (name, v) in [
            ("durationWarning", self.duration_warning),
            ("timeoutWarning", self.timeout_warning),
            ("stalePeriod", self.stale_period),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be zero or more, not {v}"));
            }
        }
        if self.max_connections == 0 || self.max_message_size < 1024 || self.max_starting == 0 {
            return Err(
                "maxConnections and maxStarting must be > 0, and maxMessageSize >= 1024".into(),
            );
        }
        if !matches!(
            self.runtime.as_str(),
            "sandbox" | "docker" | "firecracker" | "qemu" | "process"
        ) {
            return Err(format!(
                "runtime must be sandbox, docker, firecracker, qemu or process, not {:?}",
                self.runtime
            ));
        }
        Ok(())
    }

    /// The configuration as JSON, with the secret hidden.
    pub fn redacted(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        if self.jwt_secret.is_some() {
            v["jwtSecret"] = json!("(set, hidden)");
        }
        v
    }
}
