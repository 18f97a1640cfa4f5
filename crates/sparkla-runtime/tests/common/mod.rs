//! Helpers shared by the sandbox tests (and reusable by other runtimes' tests).
#![allow(dead_code)]

pub mod conformance;

use sparkla_runtime::sandbox::{SandboxConfig, SandboxInstance, SandboxRuntime};
use sparkla_runtime::{Instance, InstanceSpec, InstanceState, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The agent binary built in this workspace, if built.
pub fn agent_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPARKLA_AGENT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("sparkla-agent");
    p.is_file().then_some(p)
}

/// `true` (after printing why, loudly) when a sandbox test cannot run here.
pub fn skip(test: &str, needs_agent: bool) -> bool {
    if !is_root() {
        eprintln!("SKIPPED: {test}: the sandbox runtime needs root (CI runs as root)");
        return true;
    }
    if needs_agent && agent_path().is_none() {
        eprintln!(
            "SKIPPED: {test}: sparkla-agent is not built (cargo build -p sparkla-agent, or cargo test --workspace)"
        );
        return true;
    }
    false
}

/// A sandbox runtime of its own for one test: its own cgroup parent, state directory and
/// host uid range, so that tests running in parallel can check each other's absence of leaks.
pub struct TestSandbox {
    pub rt: Arc<SandboxRuntime>,
    pub name: String,
    pub id_base: u32,
    pub state_dir: PathBuf,
    mounts_before: usize,
}

/// Per-test host id window: `ID_SLOTS` sessions of 65536 ids.
pub const ID_SLOTS: u32 = 64;
pub const ID_WINDOW: u32 = ID_SLOTS * 65_536;

pub fn config(name: &str, slot: u32) -> SandboxConfig {
    SandboxConfig {
        launcher: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparkla-sandbox"))),
        agent: agent_path().or_else(|| Some(PathBuf::from("/bin/true"))),
        state_dir: PathBuf::from(format!("/run/sparkla-test/{name}")),
        cgroup_parent: format!("sparkla-test-{name}"),
        // Tests stay out of the cgroup of whatever runs them.
        cgroup_nest: false,
        host_id_base: 100_000_000 + slot * ID_WINDOW,
        id_slots: ID_SLOTS,
        ..Default::default()
    }
}

pub fn sandbox(name: &str, slot: u32) -> TestSandbox {
    sandbox_with(config(name, slot))
}

pub fn sandbox_with(config: SandboxConfig) -> TestSandbox {
    let name = config
        .cgroup_parent
        .trim_start_matches("sparkla-test-")
        .to_string();
    let id_base = config.host_id_base;
    let state_dir = config.state_dir.clone();
    let rt = SandboxRuntime::new(config).expect("sandbox runtime");
    TestSandbox {
        rt: Arc::new(rt),
        name,
        id_base,
        state_dir,
        mounts_before: host_mounts(),
    }
}

pub fn host_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Host processes whose uid is in the given mapped range.
pub fn processes_in_uid_range(base: u32, count: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok())
            .unwrap_or(0);
        let state = status
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        if uid >= base && uid - base < count {
            let name = status.lines().next().unwrap_or_default().to_string();
            out.push(format!("pid {pid} uid {uid} {name} {state}"));
        }
    }
    out
}

/// Host processes that are launchers of this runtime's cgroup parent.
pub fn launchers_of(parent: &str) -> Vec<u32> {
    let marker = format!("SPARKLA_SANDBOX_GROUP={parent}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
                // Zombies have no environ; a readable environ is a live process.
                out.push(pid);
            }
        }
    }
    out
}

impl TestSandbox {
    /// Everything of this test's sessions that is still on the host.
    pub fn leaks(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        for p in processes_in_uid_range(self.id_base, ID_WINDOW) {
            leaks.push(format!("process {p}"));
        }
        for pid in launchers_of(&format!("sparkla-test-{}", self.name)) {
            leaks.push(format!("launcher pid {pid}"));
        }
        for c in self.rt.cgroups().children() {
            leaks.push(format!("cgroup {c}"));
        }
        if let Ok(rd) = std::fs::read_dir(&self.state_dir) {
            for e in rd.flatten() {
                if !["root", "etc", "etc.stamp"]
                    .iter()
                    .any(|n| e.file_name() == *n)
                {
                    leaks.push(format!("state entry {}", e.path().display()));
                }
            }
        }
        let root = self.state_dir.join("root");
        if std::fs::read_dir(&root)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            leaks.push(format!("{} is not empty on the host", root.display()));
        }
        // Sessions mount only in their private mount namespaces: nothing of theirs may
        // appear in the host's mount table. (The total count is not compared: other
        // programs on the host mount and unmount meanwhile.)
        let state = self.state_dir.to_string_lossy().to_string();
        for l in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            if l.contains(&state) {
                leaks.push(format!("host mount {l}"));
            }
        }
        let _ = self.mounts_before;
        leaks
    }

    /// Wait (briefly) for processes to finish dying, then assert nothing leaked.
    pub async fn assert_no_leaks(&self) {
        let mut leaks = self.leaks();
        for _ in 0..100 {
            if leaks.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            leaks = self.leaks();
        }
        assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    }

    /// Remove the test's cgroup parent and state directory.
    pub fn cleanup(&self) {
        let _ = self.rt.cgroups().remove_parent();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn spec(id: &str) -> InstanceSpec {
    InstanceSpec {
        session_id: id.to_string(),
        ..Default::default()
    }
}

/// Run a bash script in a sandbox (debug mode, no agent): (exit code, stdout).
pub async fn sh_in(rt: &SandboxRuntime, spec: InstanceSpec, script: &str) -> (i32, String) {
    let (code, out, mut inst) = sh_keep(rt, spec, script).await;
    inst.stop().await.expect("stop");
    (code, out)
}

/// Like [`sh_in`] but returns the (exited) instance too.
pub async fn sh_keep(
    rt: &SandboxRuntime,
    spec: InstanceSpec,
    script: &str,
) -> (i32, String, SandboxInstance) {
    let mut inst = rt
        .start_command(
            spec,
            vec!["/bin/bash".into(), "-c".into(), script.to_string()],
        )
        .await
        .expect("start sandbox");
    let (mut read, write) = inst.take_stream().expect("stream");
    drop(write);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), read.read_to_end(&mut out))
        .await
        .expect("script finished in time")
        .expect("read");
    let mut code = -1;
    for _ in 0..500 {
        if let InstanceState::Exited { reason } = inst.state().await {
            code = parse_code(&reason);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (code, String::from_utf8_lossy(&out).into_owned(), inst)
}

fn parse_code(reason: &str) -> i32 {
    if reason.starts_with("the agent exited with status ") {
        reason
            .trim_start_matches("the agent exited with status ")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    } else if reason.starts_with("the agent exited") {
        0
    } else if let Some(s) = reason.strip_prefix("the agent was killed by signal ") {
        128 + s
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<i32>().ok())
            .unwrap_or(0)
    } else {
        -1
    }
}

pub fn runtime_ref(t: &TestSandbox) -> &dyn Runtime {
    t.rt.as_ref()
}
