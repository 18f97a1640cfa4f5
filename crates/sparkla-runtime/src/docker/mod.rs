//! The `docker` runtime: each session is a container on a Docker engine.
//!
//! * **Image:** the session's `environment.name` is the image (default
//!   [`image::DEFAULT_IMAGE`], built locally by `sparkla env build docker`, see [`image`]).
//! * **Agent:** the host's static `sparkla-agent` is bind-mounted read-only at
//!   [`AGENT_PATH`] and is the container's entrypoint (PID 1; it reaps its children), so any
//!   image with the interpreters installed works without rebuilding.
//! * **Transport:** the container is created with `tty=false`, `OpenStdin`, and attached
//!   (stdin, stdout, stderr) *before* it is started, so the agent's `ready` line is never
//!   missed. The multiplexed attach stream is split: stdout is the agent protocol, stderr
//!   goes to `tracing`.
//! * **Limits and hardening:** `Memory` with `MemorySwap` equal (no swap on top), `NanoCpus`,
//!   `PidsLimit`, `CapDrop: ALL`, `no-new-privileges`, a non-root user, a read-only root
//!   filesystem with bounded tmpfs for home and `/tmp`, network mode `none` unless the
//!   session may use the network, and the (already validated) mounts as binds.
//! * **Lifecycle:** containers carry the labels `sparkla.session=<id>` and
//!   `sparkla.server=<server id>`; [`DockerRuntime::sweep`] force-removes every container of
//!   this server id (call it at start-up and at shutdown). `stop` kills and removes the
//!   container; dropping an instance does so too (synchronously, best effort).

pub mod image;

use crate::{
    BoxRead, BoxWrite, Instance, InstanceSpec, InstanceState, Limits, Runtime, RuntimeError,
    SweepReport,
};
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerUpdateBody, HostConfig,
    Mount as DockerMount, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use image::{DEFAULT_IMAGE, ENV_BUILD_COMMAND};

/// Where the agent binary is mounted inside every container.
pub const AGENT_PATH: &str = "/.sparkla/agent";
/// Label naming the session a container belongs to.
pub const LABEL_SESSION: &str = "sparkla.session";
/// Label naming the server instance that started a container.
pub const LABEL_SERVER: &str = "sparkla.server";
/// Prefix of container names (`sparkla-<session id>`).
pub const NAME_PREFIX: &str = "sparkla-";

const RUNTIME: &str = "docker";

/// How the Docker runtime is set up. [`DockerConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// Identifies this server among others sharing the engine; put on every container as
    /// `sparkla.server` and used by [`DockerRuntime::sweep`]. Keep it stable across restarts
    /// of the same server (e.g. hostname and port) so a restarted server sweeps what a crashed
    /// one left.
    pub server_id: String,
    /// The engine's address (`unix:///path`, `tcp://host:port`); `None`: [`docker_host`].
    pub host: Option<String>,
    /// The host's static `sparkla-agent`; `None`: [`crate::process::find_agent`].
    pub agent: Option<PathBuf>,
    /// The image of sessions that name no environment.
    pub default_image: String,
    /// User (and group) the agent runs as inside the container.
    pub user: String,
    /// The home directory (a tmpfs) and working directory inside the container.
    pub home: String,
    /// Limits applied when the session's own limits leave one unset.
    pub default_limits: Limits,
    /// Size of each of the home and `/tmp` tmpfs when the session sets no `scratch_bytes`.
    pub default_scratch_bytes: u64,
    /// Extra environment variables for every container.
    pub env: Vec<(String, String)>,
}

impl DockerConfig {
    /// Defaults: image [`DEFAULT_IMAGE`], user `1000:1000`, home `/home/sparkla`,
    /// 1 GiB memory, 1 CPU, 256 processes, 256 MiB scratch.
    pub fn new(server_id: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            host: None,
            agent: None,
            default_image: DEFAULT_IMAGE.to_string(),
            user: "1000:1000".to_string(),
            home: "/home/sparkla".to_string(),
            default_limits: Limits {
                cpu_cores: Some(1.0),
                memory_bytes: Some(1 << 30),
                pids: Some(256),
                scratch_bytes: None,
            },
            default_scratch_bytes: 256 << 20,
            env: Vec::new(),
        }
    }
}

/// The Docker engine address this process would use: `$DOCKER_HOST`, else the default socket.
pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

/// Connect to the engine at `host` (default [`docker_host`]) and check it answers (ping),
/// negotiating the API version down to the engine's. Errors name the address tried.
pub async fn connect(host: Option<&str>) -> Result<Docker, RuntimeError> {
    let host = host.map(str::to_string).unwrap_or_else(docker_host);
    let unavailable = |reason: String| RuntimeError::Unavailable {
        runtime: RUNTIME,
        reason: format!("cannot reach the Docker engine at {host}: {reason}"),
    };
    let docker = Docker::connect_with_host(&host).map_err(|e| unavailable(e.to_string()))?;
    let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
        .await
        .map_err(|_| unavailable("no answer within 10 s".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    docker
        .ping()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(docker)
}

/// The identity of an environment image (see [`DockerRuntime::image_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image name the session asked for (or the default).
    pub name: String,
    /// `sha256:...` of the image configuration.
    pub id: String,
    /// `sha256:...` digests of the uncompressed layers, bottom first.
    pub layers: Vec<String>,
    /// The recipe hash of images built by `sparkla env build docker`.
    pub recipe: Option<String>,
}

/// Runs each session as a Docker container.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    host: String,
    config: DockerConfig,
    agent: PathBuf,
}

impl DockerRuntime {
    /// Connect to the engine (honouring `DOCKER_HOST`) and check that it answers and that
    /// the agent binary exists. Fails with [`RuntimeError::Unavailable`] naming the socket
    /// tried: the server should refuse to start with `--runtime docker` then.
    pub async fn new(config: DockerConfig) -> Result<Self, RuntimeError> {
        let agent = match config.agent.clone().or_else(crate::process::find_agent) {
            Some(a) if a.is_file() => a,
            Some(a) => {
                return Err(RuntimeError::Unavailable {
                    runtime: RUNTIME,
                    reason: format!("agent binary {} does not exist", a.display()),
                })
            }
            None => {
                return Err(RuntimeError::Unavailable {
                    runtime: RUNTIME,
                    reason: format!(
                        "the sparkla-agent binary was not found (set {} or put it next to the sparkla binary)",
                        crate::process::AGENT_ENV
                    ),
                })
            }
        };
        let agent = agent.canonicalize().unwrap_or(agent);
        let docker = connect(config.host.as_deref()).await?;
        tracing::info!(host = %config.host.clone().unwrap_or_else(docker_host), agent = %agent.display(), server_id = %config.server_id, "docker runtime connected");
        let host = config.host.clone().unwrap_or_else(docker_host);
        Ok(Self {
            docker,
            host,
            config,
            agent,
        })
    }

    /// The engine client (for tests and tools).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The agent binary mounted into containers.
    pub fn agent(&self) -> &Path {
        &self.agent
    }

    fn image_of(&self, environment: Option<&str>) -> String {
        environment
            .filter(|e| !e.is_empty())
            .unwrap_or(&self.config.default_image)
            .to_string()
    }

    fn missing_image(&self, image: &str) -> RuntimeError {
        let how = if image == self.config.default_image {
            format!("build it with `{ENV_BUILD_COMMAND}`")
        } else {
            format!(
                "pull or build it on the Docker engine (the default environment {} is built with `{ENV_BUILD_COMMAND}`)",
                self.config.default_image
            )
        };
        RuntimeError::Environment {
            name: image.to_string(),
            reason: format!("no such image on the Docker engine at {}; {how}", self.host),
        }
    }

    /// What identifies a session environment's image, for provenance: its ID (changes with
    /// every `docker import`) and its layer digests (the content; for the default image the
    /// one layer is the sha256 of the reproducible root filesystem tarball).
    pub async fn image_info(&self, environment: Option<&str>) -> Result<ImageInfo, RuntimeError> {
        let image = self.image_of(environment);
        match self.docker.inspect_image(&image).await {
            Ok(info) => Ok(ImageInfo {
                id: info.id.unwrap_or_default(),
                layers: info.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                recipe: info
                    .config
                    .and_then(|c| c.labels)
                    .and_then(|l| l.get("org.sparkla.recipe").cloned()),
                name: image,
            }),
            Err(e) if is_status(&e, 404) => Err(self.missing_image(&image)),
            Err(e) => Err(RuntimeError::Environment {
                name: image,
                reason: format!("the Docker engine failed to inspect it: {e}"),
            }),
        }
    }

    /// The container configuration of a session (public so it can be inspected in tests).
    pub fn container_config(&self, spec: &InstanceSpec) -> ContainerCreateBody {
        let image = self.image_of(spec.environment.as_deref());
        let d = &self.config.default_limits;
        let memory = spec.limits.memory_bytes.or(d.memory_bytes);
        let cpus = spec.limits.cpu_cores.or(d.cpu_cores);
        let pids = spec.limits.pids.or(d.pids);
        let scratch = spec
            .limits
            .scratch_bytes
            .or(d.scratch_bytes)
            .unwrap_or(self.config.default_scratch_bytes);
        let (uid, gid) = self
            .config
            .user
            .split_once(':')
            .unwrap_or((&self.config.user, &self.config.user));

        let mut tmpfs = HashMap::new();
        tmpfs.insert(
            "/tmp".to_string(),
            format!("rw,nosuid,nodev,size={scratch},mode=1777"),
        );
        tmpfs.insert(
            self.config.home.clone(),
            format!("rw,nosuid,nodev,size={scratch},uid={uid},gid={gid},mode=0700"),
        );

        let mut mounts = vec![DockerMount {
            target: Some(AGENT_PATH.to_string()),
            source: Some(self.agent.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        }];
        for m in &spec.mounts {
            mounts.push(DockerMount {
                target: Some(m.destination.to_string_lossy().into_owned()),
                source: Some(m.source.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only),
                ..Default::default()
            });
        }

        let mut env = vec![
            format!("HOME={}", self.config.home),
            "LANG=C.UTF-8".to_string(),
            // matplotlib and friends need a writable config dir; home is the tmpfs
            format!("MPLCONFIGDIR={}/.config/matplotlib", self.config.home),
            format!("SPARKLA_SESSION={}", spec.session_id),
        ];
        for (k, v) in self.config.env.iter().chain(spec.env.iter()) {
            env.push(format!("{k}={v}"));
        }

        let mut labels = HashMap::new();
        labels.insert(LABEL_SESSION.to_string(), spec.session_id.clone());
        labels.insert(LABEL_SERVER.to_string(), self.config.server_id.clone());

        let host_config = HostConfig {
            memory: memory.map(|m| m as i64),
            // equal to memory: no swap on top
            memory_swap: memory.map(|m| m as i64),
            nano_cpus: cpus.map(|c| (c * 1e9).round() as i64),
            pids_limit: pids.map(|p| p as i64),
            cap_drop: Some(vec!["ALL".to_string()]),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            network_mode: Some(if spec.network { "bridge" } else { "none" }.to_string()),
            mounts: Some(mounts),
            ipc_mode: Some("private".to_string()),
            // the agent is PID 1 and reaps; no docker-init
            init: Some(false),
            auto_remove: Some(false),
            // a runaway session is the first thing the OOM killer should pick
            oom_score_adj: Some(500),
            shm_size: Some(64 << 20),
            ..Default::default()
        };

        ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(vec![AGENT_PATH.to_string()]),
            cmd: Some(vec![]),
            user: Some(self.config.user.clone()),
            working_dir: Some(self.config.home.clone()),
            env: Some(env),
            labels: Some(labels),
            hostname: Some("sparkla".to_string()),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(false),
            tty: Some(false),
            network_disabled: Some(!spec.network),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn remove(&self, id: &str) -> Result<(), bollard::errors::Error> {
        remove_container(&self.docker, id).await
    }

    /// Whether the container exists and carries this server's label.
    async fn is_ours(&self, name: &str) -> bool {
        match self.docker.inspect_container(name, None).await {
            Ok(info) => info
                .config
                .and_then(|c| c.labels)
                .and_then(|l| l.get(LABEL_SERVER).cloned())
                .is_some_and(|s| s == self.config.server_id),
            Err(_) => false,
        }
    }
}

async fn remove_container(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        // already gone, or already being removed
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// A valid container name for a session of a server (Docker allows
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`): `sparkla-<server id>-<session id>`.
fn container_name(server_id: &str, session_id: &str) -> String {
    let clean: String = format!("{server_id}-{session_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{NAME_PREFIX}{clean}")
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        RUNTIME
    }

    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError> {
        let image = self.image_of(environment);
        match self.docker.inspect_image(&image).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Err(self.missing_image(&image)),
            Err(e) => Err(RuntimeError::Environment {
                name: image,
                reason: format!("the Docker engine failed to inspect it: {e}"),
            }),
        }
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        let session_id = spec.session_id.clone();
        let start_err = |reason: String| RuntimeError::Start {
            session_id: session_id.clone(),
            reason,
        };
        let config = self.container_config(&spec);
        let image = config.image.clone().unwrap_or_default();
        let name = container_name(&self.config.server_id, &spec.session_id);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let mut created = self
            .docker
            .create_container(Some(opts.clone()), config.clone())
            .await;
        if matches!(&created, Err(e) if is_status(e, 409)) && self.is_ours(&name).await {
            // A dead container of the same session (e.g. killed from outside, being
            // restarted): ours to replace.
            tracing::info!(session_id = %spec.session_id, container = %name, "replacing the session's old container");
            let _ = self.remove(&name).await;
            created = self.docker.create_container(Some(opts), config).await;
        }
        let created = match created {
            Ok(c) => c,
            Err(e) if is_status(&e, 404) => return Err(self.missing_image(&image)),
            Err(e) => return Err(start_err(format!("creating the container failed: {e}"))),
        };
        let id = created.id;
        // From here on, the guard removes the container if anything fails.
        let mut guard = ContainerGuard {
            docker: Some(self.docker.clone()),
            host: self.host.clone(),
            id: id.clone(),
        };

        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        let attached = match self.docker.attach_container(&id, Some(attach)).await {
            Ok(a) => a,
            Err(e) => {
                guard.remove().await;
                return Err(start_err(format!("attaching to the container failed: {e}")));
            }
        };
        if let Err(e) = self.docker.start_container(&id, None).await {
            guard.remove().await;
            return Err(start_err(format!("starting the container failed: {e}")));
        }
        tracing::debug!(session_id = %spec.session_id, container = %id, image = %image, "container started");

        let sid = spec.session_id.clone();
        let stdout = attached.output.filter_map(move |item| {
            let sid = sid.clone();
            async move {
                match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        Some(Ok(message))
                    }
                    Ok(LogOutput::StdErr { message }) => {
                        tracing::debug!(session_id = %sid, stderr = %String::from_utf8_lossy(&message).trim_end(), "agent stderr");
                        None
                    }
                    Ok(LogOutput::StdIn { .. }) => None,
                    Err(e) => Some(Err(std::io::Error::other(e))),
                }
            }
        });
        let read: BoxRead = Box::new(tokio_util::io::StreamReader::new(Box::pin(stdout)));
        let write: BoxWrite = Box::new(attached.input);

        guard.docker = None; // the instance owns the container now
        Ok(Box::new(DockerInstance {
            docker: self.docker.clone(),
            host: self.host.clone(),
            default_limits: self.config.default_limits.clone(),
            session_id: spec.session_id,
            id,
            stream: std::sync::Mutex::new(Some((read, write))),
            stopped: false,
        }))
    }

    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("{LABEL_SERVER}={}", self.config.server_id)],
        );
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.docker.list_containers(Some(opts)).await.map_err(|e| {
            RuntimeError::Unavailable {
                runtime: RUNTIME,
                reason: format!("listing containers at {} failed: {e}", self.host),
            }
        })?;
        let mut report = SweepReport::default();
        for c in list {
            let Some(id) = c.id else { continue };
            match self.remove(&id).await {
                Ok(()) => {
                    report.containers += 1;
                    tracing::info!(container = %id, session_id = ?c.labels.as_ref().and_then(|l| l.get(LABEL_SESSION)), "swept leftover container");
                }
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "could not remove leftover container")
                }
            }
        }
        Ok(report)
    }
}

/// Removes a half-started container on the error paths of `start`.
struct ContainerGuard {
    docker: Option<Docker>,
    host: String,
    id: String,
}

impl ContainerGuard {
    async fn remove(&mut self) {
        if let Some(d) = self.docker.take() {
            if let Err(e) = remove_container(&d, &self.id).await {
                tracing::warn!(container = %self.id, error = %e, "could not remove container");
            }
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if self.docker.take().is_some() {
            remove_blocking(&self.host, &self.id);
        }
    }
}

/// Force-remove a container from synchronous code (drop paths): on a separate thread with
/// its own small tokio runtime and engine connection, waiting for it to finish.
fn remove_blocking(host: &str, id: &str) {
    let id = id.to_string();
    let host = host.to_string();
    let joined = std::thread::Builder::new()
        .name("sparkla-docker-rm".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let docker = Docker::connect_with_host(&host).map_err(|e| e.to_string())?;
                let docker = docker
                    .negotiate_version()
                    .await
                    .map_err(|e| e.to_string())?;
                remove_container(&docker, &id)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .map(|h| h.join());
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not remove container on drop"),
        _ => tracing::warn!("could not remove container on drop (thread failed)"),
    }
}

/// One session's container.
pub struct DockerInstance {
    docker: Docker,
    host: String,
    default_limits: Limits,
    session_id: String,
    id: String,
    /// In a mutex only to make the instance `Sync`.
    stream: std::sync::Mutex<Option<(BoxRead, BoxWrite)>>,
    stopped: bool,
}

impl DockerInstance {
    /// The container's id.
    pub fn container_id(&self) -> &str {
        &self.id
    }

    async fn inspect(&self) -> Result<ContainerInspectResponse, bollard::errors::Error> {
        self.docker.inspect_container(&self.id, None).await
    }
}

/// The OOM kill count of a container's memory cgroup, when the engine is local and the
/// cgroup is visible (v1 `memory.oom_control`, v2 `memory.events`).
fn cgroup_oom_kills(id: &str) -> Option<u64> {
    let candidates = [
        format!("/sys/fs/cgroup/memory/docker/{id}/memory.oom_control"),
        format!("/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.oom_control"),
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.events"),
        format!("/sys/fs/cgroup/docker/{id}/memory.events"),
    ];
    for path in candidates {
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                if let Some(n) = line.strip_prefix("oom_kill ") {
                    return n.trim().parse().ok();
                }
            }
        }
    }
    None
}

#[async_trait]
impl Instance for DockerInstance {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.stream.get_mut().map(Option::take).unwrap_or(None)
    }

    async fn state(&self) -> InstanceState {
        if self.stopped {
            return InstanceState::Exited {
                reason: "stopped".into(),
            };
        }
        match self.inspect().await {
            Ok(info) => {
                let s = info.state.unwrap_or_default();
                if s.running.unwrap_or(false) {
                    InstanceState::Running
                } else {
                    let mut reason = format!(
                        "container {} exited with status {}",
                        s.status.map(|s| s.to_string()).unwrap_or_default(),
                        s.exit_code.unwrap_or(-1)
                    );
                    if s.oom_killed.unwrap_or(false) {
                        reason.push_str(" (out of memory)");
                    }
                    if let Some(e) = s.error.filter(|e| !e.is_empty()) {
                        reason.push_str(&format!(": {e}"));
                    }
                    InstanceState::Exited { reason }
                }
            }
            Err(e) if is_status(&e, 404) => InstanceState::Exited {
                reason: "the container was removed".into(),
            },
            Err(e) => InstanceState::Exited {
                reason: format!("the Docker engine failed to inspect the container: {e}"),
            },
        }
    }

    async fn oom_kills(&self) -> u64 {
        if let Some(n) = cgroup_oom_kills(&self.id) {
            return n;
        }
        match self.inspect().await {
            Ok(info) => info.state.and_then(|s| s.oom_killed).unwrap_or(false) as u64,
            Err(_) => 0,
        }
    }

    async fn set_limits(&self, limits: &Limits) -> Result<bool, RuntimeError> {
        let d = &self.default_limits;
        let memory = limits.memory_bytes.or(d.memory_bytes).map(|m| m as i64);
        let update = ContainerUpdateBody {
            memory,
            memory_swap: memory,
            nano_cpus: limits
                .cpu_cores
                .or(d.cpu_cores)
                .map(|c| (c * 1e9).round() as i64),
            pids_limit: limits.pids.or(d.pids).map(|p| p as i64),
            ..Default::default()
        };
        self.docker
            .update_container(&self.id, update)
            .await
            .map_err(|e| RuntimeError::Io {
                context: format!("updating the limits of container {}", self.id),
                source: std::io::Error::other(e),
            })?;
        Ok(true)
    }

    async fn stop(&mut self) -> Result<(), RuntimeError> {
        self.take_stream();
        if self.stopped {
            return Ok(());
        }
        let result = remove_container(&self.docker, &self.id).await;
        self.stopped = true;
        tracing::debug!(session_id = %self.session_id, container = %self.id, "container removed");
        result.map_err(|e| RuntimeError::Io {
            context: format!(
                "removing container {} of session {}",
                self.id, self.session_id
            ),
            source: std::io::Error::other(e),
        })
    }
}

impl Drop for DockerInstance {
    fn drop(&mut self) {
        if !self.stopped {
            self.take_stream();
            remove_blocking(&self.host, &self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("s1", "abc-1_2.3"), "sparkla-s1-abc-1_2.3");
        assert_eq!(container_name("h:80", "a/b c"), "sparkla-h_80-a_b_c");
    }
}
