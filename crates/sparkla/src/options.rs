//! Command-line options, their environment variables, the config file, and how they merge:
//! CLI beats environment beats config file beats built-in default.

use anyhow::Context;
use clap::Args;
use serde_json::Value;
use sparkla_server::Config;
use std::path::{Path, PathBuf};

/// Server options. Every option is also an environment variable (shown) and a config-file key
/// (the camelCase of the long flag, e.g. `cpuTotal`).
#[derive(Debug, Clone, Default, Args)]
pub struct Options {
    /// Config file (TOML or JSON; keys as printed by `sparkla config`) [default: .sparklarc when present]
    #[arg(long, env = "SPARKLA_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Debug logging [default: false]
    #[arg(long, env = "SPARKLA_DEBUG", global = true, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub debug: Option<bool>,

    /// Address to listen on [default: 127.0.0.1]
    #[arg(long, env = "SPARKLA_HOST", global = true)]
    pub host: Option<String>,

    /// Port to listen on; 0 picks a free port [default: 9000]
    #[arg(long, env = "SPARKLA_PORT", global = true)]
    pub port: Option<u16>,

    /// HS256 secret of client JWTs; also JWT_SECRET [default: generated, with an admin URL logged]
    #[arg(
        long,
        env = "SPARKLA_JWT_SECRET",
        global = true,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub jwt_secret: Option<String>,

    /// Session runtime: sandbox, docker, firecracker, qemu, or process (NO isolation: trusted code only) [default: sandbox]
    #[arg(long, env = "SPARKLA_RUNTIME", global = true, value_name = "NAME")]
    pub runtime: Option<String>,

    /// CPU cores for all sessions together [default: the host's logical CPUs]
    #[arg(long, env = "SPARKLA_CPU_TOTAL", global = true, value_name = "CORES")]
    pub cpu_total: Option<f64>,

    /// Memory for all sessions together, GiB [default: the host's memory]
    #[arg(long, env = "SPARKLA_MEMORY_TOTAL", global = true, value_name = "GIB")]
    pub memory_total: Option<f64>,

    /// Seconds between checks of session duration and inactivity [default: 15]
    #[arg(
        long,
        env = "SPARKLA_EXPIRY_INTERVAL",
        global = true,
        value_name = "SECS"
    )]
    pub expiry_interval: Option<f64>,

    /// Warn clients this many seconds before a session's maximum duration [default: 600]
    #[arg(
        long,
        env = "SPARKLA_DURATION_WARNING",
        global = true,
        value_name = "SECS"
    )]
    pub duration_warning: Option<f64>,

    /// Warn clients this many seconds before a session's inactivity timeout [default: 60]
    #[arg(
        long,
        env = "SPARKLA_TIMEOUT_WARNING",
        global = true,
        value_name = "SECS"
    )]
    pub timeout_warning: Option<f64>,

    /// Seconds between removals of stale sessions [default: 60]
    #[arg(
        long,
        env = "SPARKLA_STALE_INTERVAL",
        global = true,
        value_name = "SECS"
    )]
    pub stale_interval: Option<f64>,

    /// Seconds a stopped or failed session is kept so clients can learn why [default: 3600]
    #[arg(long, env = "SPARKLA_STALE_PERIOD", global = true, value_name = "SECS")]
    pub stale_period: Option<f64>,

    /// Warm instances (agent and python ready) kept for new sessions; 0: none [default: 2]
    #[arg(long, env = "SPARKLA_POOL_SIZE", global = true, value_name = "N")]
    pub pool_size: Option<usize>,

    /// Maximum simultaneous WebSocket connections [default: 10000]
    #[arg(long, env = "SPARKLA_MAX_CONNECTIONS", global = true, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Maximum size of one WebSocket message or HTTP body, bytes [default: 16777216]
    #[arg(
        long,
        env = "SPARKLA_MAX_MESSAGE_SIZE",
        global = true,
        value_name = "BYTES"
    )]
    pub max_message_size: Option<usize>,

    /// Session defaults, a JSON SoftwareSession object [default: {"cpuRequest":1,"memoryRequest":1,"durationRequest":21600,"timeoutRequest":3600}]
    #[arg(
        long,
        env = "SPARKLA_SESSION_DEFAULTS",
        global = true,
        value_name = "JSON"
    )]
    pub session_defaults: Option<String>,

    /// Host directories sessions may mount, comma-separated [default: none]
    #[arg(
        long,
        env = "SPARKLA_MOUNT_ALLOW",
        global = true,
        value_delimiter = ',',
        value_name = "DIRS"
    )]
    pub mount_allow: Option<Vec<PathBuf>>,

    /// Let sessions that request networkTransfer use the network [default: false]
    #[arg(long, env = "SPARKLA_ALLOW_NETWORK", global = true, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_network: Option<bool>,

    /// The sparkla-agent binary [default: next to the sparkla binary]
    #[arg(long, env = "SPARKLA_AGENT", global = true, value_name = "PATH")]
    pub agent: Option<PathBuf>,

    /// Seconds a session's agent may take to start [default: 30]
    #[arg(
        long,
        env = "SPARKLA_START_TIMEOUT",
        global = true,
        value_name = "SECS"
    )]
    pub start_timeout: Option<f64>,

    /// Restarts of a session whose agent dies before it fails [default: 3]
    #[arg(long, env = "SPARKLA_MAX_RESTARTS", global = true, value_name = "N")]
    pub max_restarts: Option<u32>,

    /// Sessions starting at once; more wait their turn [default: 4 per CPU]
    #[arg(long, env = "SPARKLA_MAX_STARTING", global = true, value_name = "N")]
    pub max_starting: Option<usize>,
}

/// Read a config file: JSON when it starts with `{`, else TOML.
pub fn read_file(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let config: Config = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)
            .with_context(|| format!("config file {} (JSON)", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("config file {} (TOML)", path.display()))?
    };
    Ok(config)
}

impl Options {
    /// The effective configuration: defaults, then the config file, then the environment and
    /// the command line (clap already put CLI over env).
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(p) => Some(p.clone()),
            None => {
                let p = PathBuf::from(".sparklarc");
                p.is_file().then_some(p)
            }
        };
        let mut c = match &file {
            Some(p) => read_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            debug,
            host,
            port,
            runtime,
            cpu_total,
            memory_total,
            expiry_interval,
            duration_warning,
            timeout_warning,
            stale_interval,
            stale_period,
            pool_size,
            max_connections,
            max_message_size,
            mount_allow,
            allow_network,
            start_timeout,
            max_restarts,
            max_starting
        );
        if let Some(a) = &self.agent {
            c.agent = Some(a.clone());
        }
        // CLI and SPARKLA_JWT_SECRET (clap), then JWT_SECRET (the original's name), then file.
        if let Some(s) = self
            .jwt_secret
            .clone()
            .or_else(|| std::env::var("JWT_SECRET").ok().filter(|s| !s.is_empty()))
        {
            c.jwt_secret = Some(s);
        }
        if let Some(json) = &self.session_defaults {
            let v: Value = serde_json::from_str(json).context("--session-defaults is not JSON")?;
            c.session_defaults = match v {
                Value::Object(m) => m,
                _ => anyhow::bail!("--session-defaults must be a JSON object"),
            };
        }
        c.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(c)
    }
}
