//! The `process` runtime: the agent runs as a plain child process of the server.
//!
//! **No isolation at all**: code in a session runs as the server's user, sees the host's
//! files and network, and no limits are enforced. Use it for development, tests and trusted
//! code only; never for untrusted code (use `sandbox`, `docker` or `firecracker`).
//!
//! Each instance is one `sparkla-agent` in its own process group (so the kernels it starts
//! can be killed with it), in a fresh temporary working directory that is removed on stop.
//! The child is killed when its [`ProcessInstance`] is dropped.

use crate::{
    BoxRead, BoxWrite, Instance, InstanceSpec, InstanceState, Runtime, RuntimeError, SweepReport,
};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use tokio::process::{Child, Command};

/// The environment variable naming the agent binary.
pub const AGENT_ENV: &str = "SPARKLA_AGENT";

/// Prefix of the temporary working directories of process instances.
const DIR_PREFIX: &str = "sparkla-process-";

/// Find the `sparkla-agent` binary: `$SPARKLA_AGENT`, else next to the current executable,
/// else in its parent directory (test binaries live in `target/<profile>/deps/`).
pub fn find_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(AGENT_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    crate::sibling_binary("sparkla-agent")
}

/// Runs each session's agent as a child process, without isolation.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    agent: PathBuf,
    /// Where working directories are made (default: the system temp dir).
    base: PathBuf,
}

impl ProcessRuntime {
    /// A runtime using the given agent binary, or the one [`find_agent`] finds.
    pub fn new(agent: Option<PathBuf>) -> Result<Self, RuntimeError> {
        let agent = match agent.or_else(find_agent) {
            Some(a) => a,
            None => {
                return Err(RuntimeError::Unavailable {
                    runtime: "process",
                    reason: format!(
                        "the sparkla-agent binary was not found (set {AGENT_ENV} or put it next to the sparkla binary)"
                    ),
                })
            }
        };
        if !agent.is_file() {
            return Err(RuntimeError::Unavailable {
                runtime: "process",
                reason: format!("agent binary {} does not exist", agent.display()),
            });
        }
        Ok(Self {
            agent,
            base: std::env::temp_dir(),
        })
    }

    /// The agent binary this runtime starts.
    pub fn agent(&self) -> &Path {
        &self.agent
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError> {
        match environment {
            None | Some("") | Some("host") | Some("default") => Ok(()),
            Some(name) => Err(RuntimeError::Environment {
                name: name.to_string(),
                reason: "the process runtime only has the host's environment".into(),
            }),
        }
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        self.prepare(spec.environment.as_deref()).await?;
        if !spec.mounts.is_empty() {
            return Err(RuntimeError::Refused(
                "the process runtime does not support volume mounts".into(),
            ));
        }
        let safe: String = spec
            .session_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .base
            .join(format!("{DIR_PREFIX}{safe}-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
        let mut cmd = Command::new(&self.agent);
        cmd.current_dir(&dir)
            .env("SPARKLA_SESSION_ID", &spec.session_id)
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(RuntimeError::Start {
                    session_id: spec.session_id,
                    reason: format!("spawning {}: {e}", self.agent.display()),
                });
            }
        };
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let pgid = child.id().map(|p| p as i32);
        tracing::debug!(session_id = %spec.session_id, pid = ?pgid, "process instance started");
        Ok(Box::new(ProcessInstance {
            session_id: spec.session_id,
            child: tokio::sync::Mutex::new(child),
            pgid,
            exited: Mutex::new(None),
            stream: Mutex::new(Some((Box::new(stdout), Box::new(stdin)))),
            dir: Some(dir),
        }))
    }

    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        // Working directories of a crashed server (its agents died with it: kill_on_drop, or
        // when their stdin closed).
        let mut report = SweepReport::default();
        if let Ok(entries) = std::fs::read_dir(&self.base) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with(DIR_PREFIX)
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    report.directories += 1;
                }
            }
        }
        Ok(report)
    }
}

/// One agent process (and its process group).
pub struct ProcessInstance {
    session_id: String,
    child: tokio::sync::Mutex<Child>,
    pgid: Option<i32>,
    exited: Mutex<Option<String>>,
    /// In a mutex only to make the instance `Sync`.
    stream: Mutex<Option<(BoxRead, BoxWrite)>>,
    dir: Option<PathBuf>,
}

impl ProcessInstance {
    fn kill_group(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: plain syscall; a negative pid addresses the process group.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

#[async_trait]
impl Instance for ProcessInstance {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.stream.get_mut().expect("stream lock").take()
    }

    async fn state(&self) -> InstanceState {
        if let Some(reason) = self.exited.lock().expect("exited lock").clone() {
            return InstanceState::Exited { reason };
        }
        let mut child = self.child.lock().await;
        match child.try_wait() {
            Ok(None) => InstanceState::Running,
            Ok(Some(status)) => {
                let reason = format!("agent exited: {status}");
                *self.exited.lock().expect("exited lock") = Some(reason.clone());
                InstanceState::Exited { reason }
            }
            Err(e) => InstanceState::Exited {
                reason: format!("agent state unknown: {e}"),
            },
        }
    }

    async fn oom_kills(&self) -> u64 {
        0
    }

    async fn stop(&mut self) -> Result<(), RuntimeError> {
        self.kill_group();
        {
            let mut child = self.child.lock().await;
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
        // Kernels in the group may outlive the agent by a moment: wait until the group is empty.
        if let Some(pgid) = self.pgid {
            for _ in 0..200 {
                if !group_alive(pgid) {
                    break;
                }
                self.kill_group();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(RuntimeError::io(format!("removing {}", dir.display()), e));
                }
            }
        }
        Ok(())
    }
}

/// Whether a process group still has a live (not zombie) member. `kill(-pgid, 0)` would
/// also count zombies, which linger until whoever adopted them reaps them.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // After "(comm)": state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields
            .first()
            .is_some_and(|state| *state != "Z" && *state != "X")
            && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
    })
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        self.kill_group();
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_agent_is_unavailable() {
        let e = ProcessRuntime::new(Some("/nonexistent/sparkla-agent".into())).unwrap_err();
        assert!(matches!(e, RuntimeError::Unavailable { .. }), "{e}");
    }

    /// The runtime with a shell standing in for the agent (an echo loop): the stream works,
    /// and stop kills the whole group and removes the working directory.
    #[tokio::test]
    async fn start_and_stop_reclaims_everything() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-agent");
        std::fs::write(
            &script,
            "#!/bin/sh\necho $$\nsleep 1000 &\nwhile read -r l; do echo \"$l\"; done\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut rt = ProcessRuntime::new(Some(script)).unwrap();
        rt.base = dir.path().to_path_buf();
        let mut inst = rt
            .start(InstanceSpec {
                session_id: "s1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let (r, mut w) = inst.take_stream().unwrap();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let pgid: i32 = line.trim().parse().unwrap();
        w.write_all(b"hello\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "hello\n");
        assert_eq!(inst.state().await, InstanceState::Running);
        let dirs = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(DIR_PREFIX))
                .count()
        };
        assert_eq!(dirs(), 1, "one working directory");
        assert!(group_alive(pgid), "process group is running");
        inst.stop().await.unwrap();
        assert!(!group_alive(pgid), "process group is gone");
        assert_eq!(dirs(), 0, "working directory removed");
        assert!(matches!(
            rt.start(InstanceSpec {
                session_id: "s2".into(),
                mounts: vec![crate::Mount {
                    source: "/".into(),
                    destination: "/x".into(),
                    read_only: true
                }],
                ..Default::default()
            })
            .await,
            Err(RuntimeError::Refused(_))
        ));
    }
}
