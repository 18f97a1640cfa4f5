//! The built-in sandbox runtime: namespaces, cgroups and seccomp, no daemon, no images.
//!
//! Each session is one `sparkla-sandbox` launcher process (see [`launcher`]) that clones
//! the session into new user, pid, mount, network, ipc, uts and cgroup namespaces and execs
//! the agent as PID 1 there. The runtime creates the session's cgroup before spawning the
//! launcher (the launcher joins it first thing) and removes it at the end; killing the
//! cgroup kills everything of the session, launcher and slirp4netns included.
//!
//! Nothing of a session lives on the host's filesystems: its root, `/tmp` and home are
//! tmpfs mounts in its private mount namespace, which vanish with its last process. The
//! only host state is the cgroup, which [`SandboxRuntime::sweep`] reclaims after a crash.
//!
//! # Privileges
//! The runtime needs root (more exactly: CAP_SYS_ADMIN over cgroupfs and the right to write
//! uid maps for an unprivileged host range). Without root, [`SandboxRuntime::new`] refuses
//! with [`RuntimeError::Unavailable`] and says why: without cgroups there would be no memory,
//! cpu or pids limit, so a session could starve its neighbours, which Sparkla does not allow.
//! (Use the `process` runtime for development without root.)

pub mod launcher;
pub mod mounts;
pub mod pool;
pub mod seccomp;

use async_trait::async_trait;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

use crate::cgroup::{Cgroup, CgroupLimits, Cgroups};
use crate::{
    BoxRead, BoxWrite, Instance, InstanceSpec, InstanceState, Limits, Runtime, RuntimeError,
    SweepReport,
};
pub use launcher::{LaunchSpec, AGENT_PATH};
pub use mounts::validate_mounts;

/// How long a launcher may take to report that its sandbox is set up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Configuration of the sandbox runtime. `Default` gives production defaults.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The launcher binary. Default: `$SPARKLA_SANDBOX_LAUNCHER`, else `sparkla-sandbox`
    /// next to the current executable (or one directory up, for test binaries in `deps/`),
    /// else the current executable itself (which must then call
    /// [`launcher::run_if_requested`] first thing in `main`).
    pub launcher: Option<PathBuf>,
    /// The agent binary (static). Default: `$SPARKLA_AGENT`, else `sparkla-agent` next to
    /// the current executable (or one directory up).
    pub agent: Option<PathBuf>,
    /// Where environment directories live: `<environments>/<name>` is a root filesystem.
    pub environments: PathBuf,
    /// A directory for the runtime's own state (one empty mount point, nothing per session).
    pub state_dir: PathBuf,
    /// Name of the parent cgroup of all sessions.
    pub cgroup_parent: String,
    /// Nest the parent cgroup under the server's own cgroup when possible.
    pub cgroup_nest: bool,
    /// Defaults for limits a session does not set.
    pub default_limits: Limits,
    /// Host uid/gid ranges of sessions: session *k* maps ids `0..id_count` inside to
    /// `host_id_base + k * id_count ..` on the host, for `k` in `0..id_slots`. Every live
    /// session has a range of its own (never host root, never another session's), so no two
    /// sessions share a host uid. The window must not overlap /etc/subuid or /etc/subgid.
    pub host_id_base: u32,
    pub id_count: u32,
    pub id_slots: u32,
    /// The uid/gid code runs as inside.
    pub inner_id: u32,
    /// slirp4netns, for sessions allowed to use the network.
    pub slirp4netns: PathBuf,
    /// Install the seccomp filter (always on in production; a switch for diagnosis).
    pub seccomp: bool,
    pub hostname: String,
}

/// Default number of processes/threads in a session.
pub const DEFAULT_PIDS: u64 = 512;
/// Default size of a session's scratch space (home, /tmp, /dev/shm).
pub const DEFAULT_SCRATCH_BYTES: u64 = 1 << 30;

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            launcher: None,
            agent: None,
            environments: PathBuf::from("/var/lib/sparkla/environments"),
            state_dir: PathBuf::from("/run/sparkla/sandbox"),
            cgroup_parent: "sparkla".into(),
            cgroup_nest: true,
            default_limits: Limits {
                cpu_cores: None,
                memory_bytes: None,
                pids: Some(DEFAULT_PIDS),
                scratch_bytes: Some(DEFAULT_SCRATCH_BYTES),
            },
            host_id_base: 1_000_000_000,
            id_count: 65_536,
            id_slots: 4096,
            inner_id: 1000,
            slirp4netns: PathBuf::from("/usr/bin/slirp4netns"),
            seccomp: true,
            hostname: "sparkla".into(),
        }
    }
}

fn unavailable(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Unavailable {
        runtime: "sandbox",
        reason: reason.into(),
    }
}

pub use crate::sibling_binary;

/// The built-in sandbox runtime.
pub struct SandboxRuntime {
    config: SandboxConfig,
    launcher: PathBuf,
    agent: PathBuf,
    cgroups: Cgroups,
    root_mountpoint: PathBuf,
    etc_skeleton: PathBuf,
    ids: Arc<IdSlots>,
}

impl SandboxRuntime {
    /// Check the host and set up the runtime's parent cgroup and state directory.
    pub fn new(config: SandboxConfig) -> Result<Self, RuntimeError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(unavailable(
                "the sandbox runtime needs root: it writes uid maps for an unprivileged host \
                 range and creates cgroups for memory/cpu/pids limits (run as root, or use the \
                 process runtime for development)",
            ));
        }
        let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1);
        if max_userns == 0 {
            return Err(unavailable(
                "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)",
            ));
        }
        let launcher = match &config.launcher {
            Some(p) => p.clone(),
            None => std::env::var_os("SPARKLA_SANDBOX_LAUNCHER")
                .map(PathBuf::from)
                .or_else(|| sibling_binary("sparkla-sandbox"))
                .or_else(|| std::env::current_exe().ok())
                .ok_or_else(|| unavailable("cannot find the sparkla-sandbox launcher"))?,
        };
        if !launcher.is_file() {
            return Err(unavailable(format!(
                "the launcher {} does not exist",
                launcher.display()
            )));
        }
        let agent = match &config.agent {
            Some(p) => p.clone(),
            None => std::env::var_os("SPARKLA_AGENT")
                .map(PathBuf::from)
                .or_else(|| sibling_binary("sparkla-agent"))
                .ok_or_else(|| {
                    unavailable("cannot find the sparkla-agent binary (set SPARKLA_AGENT)")
                })?,
        };
        if config.id_count == 0 || config.id_slots == 0 || config.host_id_base == 0 {
            return Err(unavailable("host id ranges must be non-empty and above 0"));
        }
        let window_end = u64::from(config.host_id_base)
            + u64::from(config.id_count) * u64::from(config.id_slots);
        if window_end > u64::from(u32::MAX) {
            return Err(unavailable(format!(
                "host id window {}..{window_end} exceeds 32 bits",
                config.host_id_base
            )));
        }
        for file in ["/etc/subuid", "/etc/subgid"] {
            if let Some(clash) = subid_overlap(file, u64::from(config.host_id_base), window_end) {
                return Err(unavailable(format!(
                    "the sandbox's host id window {}..{window_end} overlaps {file} ({clash}): choose another host_id_base",
                    config.host_id_base
                )));
            }
        }
        let ids = Arc::new(IdSlots::new(
            config.host_id_base,
            config.id_count,
            config.id_slots,
        ));
        let cgroups = Cgroups::detect(&config.cgroup_parent, config.cgroup_nest)?;
        let root_mountpoint = config.state_dir.join("root");
        std::fs::create_dir_all(&root_mountpoint)
            .map_err(|e| RuntimeError::io(format!("creating {}", root_mountpoint.display()), e))?;
        let etc_skeleton = config.state_dir.join("etc");
        launcher::prepare_etc_skeleton(&etc_skeleton)
            .map_err(|e| RuntimeError::io(format!("preparing {}", etc_skeleton.display()), e))?;
        tracing::info!(
            launcher = %launcher.display(),
            agent = %agent.display(),
            cgroup = ?cgroups.version(),
            parents = ?cgroups.parent_dirs(),
            "sandbox runtime ready"
        );
        Ok(Self {
            config,
            launcher,
            agent,
            cgroups,
            root_mountpoint,
            etc_skeleton,
            ids,
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The session cgroups' parent groups.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// The agent binary sessions run.
    pub fn agent(&self) -> &Path {
        &self.agent
    }

    fn environment_dir(&self, name: Option<&str>) -> Result<Option<PathBuf>, RuntimeError> {
        let Some(name) = name else {
            return Ok(None);
        };
        let env_err = |reason: String| RuntimeError::Environment {
            name: name.to_string(),
            reason,
        };
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(env_err("invalid environment name".into()));
        }
        let dir = self.config.environments.join(name);
        if !dir.join("usr").is_dir() {
            return Err(env_err(format!(
                "{} is not a root filesystem (no usr/ in it)",
                dir.display()
            )));
        }
        Ok(Some(dir))
    }

    /// The limits a session gets: its own, else the runtime's defaults.
    pub fn effective_limits(&self, limits: &Limits) -> Limits {
        let d = &self.config.default_limits;
        Limits {
            cpu_cores: limits.cpu_cores.or(d.cpu_cores),
            memory_bytes: limits.memory_bytes.or(d.memory_bytes),
            pids: limits.pids.or(d.pids),
            scratch_bytes: limits
                .scratch_bytes
                .or(d.scratch_bytes)
                .or(Some(DEFAULT_SCRATCH_BYTES)),
        }
    }

    /// Start a sandbox running `command` instead of the agent (debugging and tests). Its
    /// stdin/stdout are the instance's stream.
    pub async fn start_command(
        &self,
        spec: InstanceSpec,
        command: Vec<String>,
    ) -> Result<SandboxInstance, RuntimeError> {
        self.launch(spec, Some(command)).await
    }

    /// Start a sandbox with the agent; the concrete type (see [`Runtime::start`]).
    pub async fn start_sandbox(&self, spec: InstanceSpec) -> Result<SandboxInstance, RuntimeError> {
        self.launch(spec, None).await
    }

    async fn launch(
        &self,
        spec: InstanceSpec,
        command: Option<Vec<String>>,
    ) -> Result<SandboxInstance, RuntimeError> {
        let id = spec.session_id.clone();
        if id.is_empty()
            || id.len() > 200
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || id.starts_with('.')
        {
            return Err(RuntimeError::Refused(format!(
                "session id {id:?} is not usable as a sandbox name"
            )));
        }
        let rootfs = self.environment_dir(spec.environment.as_deref())?;
        let limits = self.effective_limits(&spec.limits);
        let start_err = |reason: String| RuntimeError::Start {
            session_id: id.clone(),
            reason,
        };
        if spec.network && !self.config.slirp4netns.is_file() {
            return Err(start_err(format!(
                "network access needs {}, which is not installed",
                self.config.slirp4netns.display()
            )));
        }
        let id_slot = allocate_ids(&self.ids).ok_or_else(|| {
            start_err(format!(
                "all {} host id ranges are in use (too many sessions)",
                self.config.id_slots
            ))
        })?;
        let cgroup = self.cgroups.create(
            &id,
            &CgroupLimits {
                memory_bytes: limits.memory_bytes,
                cpu_cores: limits.cpu_cores,
                pids: limits.pids,
            },
        )?;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/home/user".into()),
            ("USER".into(), "user".into()),
            ("LOGNAME".into(), "user".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("SPARKLA_SESSION".into(), id.clone()),
        ];
        for (k, v) in &spec.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let launch = LaunchSpec {
            session_id: id.clone(),
            hostname: self.config.hostname.clone(),
            root_mountpoint: self.root_mountpoint.clone(),
            etc_skeleton: Some(self.etc_skeleton.clone()),
            rootfs,
            agent: self.agent.clone(),
            command,
            scratch_bytes: limits.scratch_bytes.unwrap_or(DEFAULT_SCRATCH_BYTES),
            host_id_base: id_slot.host_base,
            id_count: self.config.id_count,
            inner_id: self.config.inner_id,
            network: spec.network.then(|| self.config.slirp4netns.clone()),
            mounts: spec
                .mounts
                .iter()
                .map(|m| launcher::BindMount {
                    source: m.source.clone(),
                    destination: m.destination.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            cgroup_procs: cgroup.procs_files(),
            env,
            seccomp: self.config.seccomp,
        };
        let json = serde_json::to_string(&launch).expect("spec serialises");

        // If this future is dropped while the launcher starts (e.g. a pool refill aborted),
        // the guard reclaims the cgroup and with it every process already in it.
        let guard = CgroupGuard(Some(cgroup));
        let result = self.spawn(&id, &json).await;
        let cgroup = guard.disarm();
        match result {
            Ok((child, stream, agent_pid, tail)) => Ok(SandboxInstance {
                session_id: id,
                cgroup,
                child: Mutex::new(Some(child)),
                exited: Mutex::new(None),
                agent_pid,
                stream: Mutex::new(Some(stream)),
                stderr_tail: tail,
                stopped: false,
                defaults: self.config.default_limits.clone(),
                _id_slot: id_slot,
            }),
            Err(reason) => {
                let cg = cgroup.clone();
                let _ =
                    tokio::task::spawn_blocking(move || cg.remove(Duration::from_secs(5))).await;
                Err(start_err(reason))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn spawn(
        &self,
        id: &str,
        spec_json: &str,
    ) -> Result<
        (
            tokio::process::Child,
            (BoxRead, BoxWrite),
            i32,
            Arc<Mutex<VecDeque<String>>>,
        ),
        String,
    > {
        let mut fds = [0; 2];
        // SAFETY: valid array for pipe2.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptors from pipe2, owned here.
        let (status_r, status_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let w = status_w.as_raw_fd();
        let mut cmd = std::process::Command::new(&self.launcher);
        cmd.env_clear()
            .env(launcher::SPEC_ENV, spec_json)
            .env(launcher::GROUP_ENV, &self.config.cgroup_parent)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if w == launcher::STATUS_FD {
                    libc::fcntl(w, libc::F_SETFD, 0);
                } else if libc::dup2(w, launcher::STATUS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.launcher.display()))?;
        drop(status_w);

        // Forward the launcher's and agent's stderr to tracing; keep the last lines.
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(session_id = %id, line = %line, "sandbox stderr");
                    let mut t = tail.lock().expect("tail lock");
                    if t.len() >= 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }

        let status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)
            .map_err(|e| format!("status pipe: {e}"))?;
        let mut reader = tokio::io::BufReader::new(status);
        let mut line = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, reader.read_line(&mut line)).await;
        let line = line.trim().to_string();
        let outcome = match read {
            Err(_) => Err(format!(
                "the sandbox did not start within {}s",
                START_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("reading the launcher's status: {e}")),
            Ok(Ok(_)) => {
                if let Some(pid) = line.strip_prefix("ok ") {
                    pid.parse::<i32>()
                        .map_err(|_| format!("bad launcher status {line:?}"))
                } else if let Some(e) = line.strip_prefix("error: ") {
                    Err(e.to_string())
                } else {
                    let status = child.wait().await.ok();
                    let tail = tail.lock().expect("tail lock");
                    Err(format!(
                        "the launcher exited ({status:?}) without reporting: {}",
                        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
                    ))
                }
            }
        };
        match outcome {
            Ok(agent_pid) => {
                let stdin = child.stdin.take().expect("piped stdin");
                let stdout = child.stdout.take().expect("piped stdout");
                Ok((
                    child,
                    (Box::new(stdout) as BoxRead, Box::new(stdin) as BoxWrite),
                    agent_pid,
                    tail,
                ))
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
        }
    }

    /// Kill launchers of this runtime's cgroup parent that are not in a cgroup (e.g. killed
    /// between spawn and joining it). Returns how many were killed.
    fn kill_stray_launchers(&self) -> usize {
        let marker = format!("{}={}", launcher::GROUP_ENV, self.config.cgroup_parent);
        let me = std::process::id() as i32;
        let mut n = 0;
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return 0;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
                // SAFETY: kill(2) on a pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                n += 1;
            }
        }
        n
    }
}

#[async_trait]
impl Runtime for SandboxRuntime {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError> {
        self.environment_dir(environment).map(|_| ())
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        Ok(Box::new(self.start_sandbox(spec).await?))
    }

    /// Reclaim what a crashed server left: every session cgroup under the parent (with
    /// all its processes), stray launchers, and stale entries of the state directory. Call
    /// it at start-up, before any session of this runtime begins.
    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        let cgroups = self.cgroups.clone();
        let state_dir = self.config.state_dir.clone();
        let processes = self.kill_stray_launchers();
        let report = tokio::task::spawn_blocking(move || -> Result<SweepReport, RuntimeError> {
            let mut report = SweepReport::default();
            for name in cgroups.children() {
                let cg = cgroups.open(&name);
                report.processes += cg.pids().len();
                cg.remove(Duration::from_secs(5))?;
                report.cgroups += 1;
            }
            if let Ok(rd) = std::fs::read_dir(&state_dir) {
                for e in rd.flatten() {
                    if !["root", "etc", "etc.stamp"]
                        .iter()
                        .any(|n| e.file_name() == *n)
                    {
                        let p = e.path();
                        let _ = if p.is_dir() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                        report.directories += 1;
                    }
                }
            }
            Ok(report)
        })
        .await
        .map_err(|e| RuntimeError::io("sweep", std::io::Error::other(e.to_string())))??;
        Ok(SweepReport {
            processes: report.processes + processes,
            ..report
        })
    }
}

/// The first /etc/subuid-style entry (`name:start:count`) overlapping `[start, end)`.
fn subid_overlap(file: &str, start: u64, end: u64) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.trim().split(':');
        let (_name, s, c) = (it.next()?, it.next()?, it.next()?);
        let (s, c) = (s.parse::<u64>().ok()?, c.parse::<u64>().ok()?);
        (s < end && start < s + c).then(|| l.trim().to_string())
    })
}

/// Allocation of per-session host id ranges (round robin, so that a range is reused as
/// late as possible).
struct IdSlots {
    base: u32,
    count: u32,
    slots: u32,
    state: Mutex<(u32, std::collections::BTreeSet<u32>)>,
}

/// A session's host id range; released when dropped.
struct IdSlot {
    ids: Arc<IdSlots>,
    slot: u32,
    host_base: u32,
}

impl IdSlots {
    fn new(base: u32, count: u32, slots: u32) -> Self {
        Self {
            base,
            count,
            slots,
            state: Mutex::new((0, Default::default())),
        }
    }
}

fn allocate_ids(ids: &Arc<IdSlots>) -> Option<IdSlot> {
    let mut st = ids.state.lock().expect("id slots lock");
    for i in 0..ids.slots {
        let slot = (st.0 + i) % ids.slots;
        if !st.1.contains(&slot) {
            st.1.insert(slot);
            st.0 = (slot + 1) % ids.slots;
            return Some(IdSlot {
                ids: ids.clone(),
                slot,
                host_base: ids.base + slot * ids.count,
            });
        }
    }
    None
}

impl Drop for IdSlot {
    fn drop(&mut self) {
        self.ids
            .state
            .lock()
            .expect("id slots lock")
            .1
            .remove(&self.slot);
    }
}

struct CgroupGuard(Option<Cgroup>);

impl CgroupGuard {
    fn disarm(mut self) -> Cgroup {
        self.0.take().expect("armed guard")
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                tracing::warn!(error = %e, "reclaiming the cgroup of an abandoned start");
            }
        }
    }
}

/// One running sandbox.
pub struct SandboxInstance {
    session_id: String,
    cgroup: Cgroup,
    child: Mutex<Option<tokio::process::Child>>,
    exited: Mutex<Option<String>>,
    agent_pid: i32,
    stream: Mutex<Option<(BoxRead, BoxWrite)>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stopped: bool,
    defaults: Limits,
    /// Released after the cgroup is gone (field order: dropped after `Drop::drop` ran).
    _id_slot: IdSlot,
}

impl SandboxInstance {
    /// The session's cgroup (limits, usage, OOM kills).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The host pid of the sandbox's PID 1 (the agent).
    pub fn agent_pid(&self) -> i32 {
        self.agent_pid
    }

    /// The last lines the sandbox wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Change the cgroup limits of the running instance (memory, cpu, pids). Used by the
    /// pool when it hands out a warm sandbox to a session with its own limits.
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), RuntimeError> {
        self.cgroup.set_limits(limits)
    }
}

#[async_trait]
impl Instance for SandboxInstance {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.stream.lock().expect("stream lock").take()
    }

    async fn state(&self) -> InstanceState {
        if let Some(reason) = self.exited.lock().expect("exited lock").clone() {
            return InstanceState::Exited { reason };
        }
        let mut guard = self.child.lock().expect("child lock");
        let Some(child) = guard.as_mut() else {
            return InstanceState::Exited {
                reason: "stopped".into(),
            };
        };
        match child.try_wait() {
            Ok(None) => InstanceState::Running,
            Ok(Some(status)) => {
                let mut reason = match status.code() {
                    Some(0) => "the agent exited".to_string(),
                    Some(c) if c > 128 => format!("the agent was killed by signal {}", c - 128),
                    Some(c) => format!("the agent exited with status {c}"),
                    None => format!("the launcher ended: {status}"),
                };
                let oom = self.cgroup.oom_kills();
                if oom > 0 {
                    reason.push_str(&format!(" (out of memory: {oom} OOM kills)"));
                }
                *self.exited.lock().expect("exited lock") = Some(reason.clone());
                InstanceState::Exited { reason }
            }
            Err(e) => InstanceState::Exited {
                reason: format!("unknown: {e}"),
            },
        }
    }

    async fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills()
    }

    async fn set_limits(&self, limits: &Limits) -> Result<bool, RuntimeError> {
        let d = &self.defaults;
        self.cgroup.set_limits(&CgroupLimits {
            memory_bytes: limits.memory_bytes.or(d.memory_bytes),
            cpu_cores: limits.cpu_cores.or(d.cpu_cores),
            pids: limits.pids.or(d.pids),
        })?;
        Ok(true)
    }

    async fn stop(&mut self) -> Result<(), RuntimeError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.stream.lock().expect("stream lock").take();
        let cg = self.cgroup.clone();
        let removed = tokio::task::spawn_blocking(move || cg.remove(Duration::from_secs(10)))
            .await
            .map_err(|e| RuntimeError::io("stop", std::io::Error::other(e.to_string())))?;
        let child = self.child.lock().expect("child lock").take();
        if let Some(mut child) = child {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        tracing::debug!(session_id = %self.session_id, "sandbox stopped");
        removed
    }
}

impl Drop for SandboxInstance {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            let _ = child.start_kill();
        }
        if let Err(e) = self.cgroup.remove(Duration::from_secs(5)) {
            tracing::warn!(session_id = %self.session_id, error = %e, "reclaiming a dropped sandbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_slots_are_distinct_and_reused_late() {
        let ids = Arc::new(IdSlots::new(1_000_000, 65_536, 3));
        let a = allocate_ids(&ids).unwrap();
        let b = allocate_ids(&ids).unwrap();
        assert_eq!((a.host_base, b.host_base), (1_000_000, 1_065_536));
        drop(a);
        // Round robin: slot 2 before the freed slot 0.
        let c = allocate_ids(&ids).unwrap();
        assert_eq!(c.host_base, 1_131_072);
        let d = allocate_ids(&ids).unwrap();
        assert_eq!(d.host_base, 1_000_000);
        assert!(allocate_ids(&ids).is_none(), "more sessions than slots");
        drop(b);
        assert_eq!(allocate_ids(&ids).unwrap().host_base, 1_065_536);
    }

    #[test]
    fn subid_overlap_detection() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\nbob:165536:65536\n").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(
            subid_overlap(f, 150_000, 160_000).as_deref(),
            Some("alice:100000:65536")
        );
        assert!(subid_overlap(f, 231_072, 300_000).is_none());
        assert!(subid_overlap(f, 0, 100_000).is_none());
        assert!(subid_overlap("/nonexistent", 0, 1 << 31).is_none());
    }
}
