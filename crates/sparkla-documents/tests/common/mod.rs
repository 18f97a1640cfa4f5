//! Helpers of the document tests: the real sandbox runtime (own cgroup parent, state
//! directory and uid range per test), the real agent, and nbformat validation.
#![allow(dead_code)]

use sparkla_documents::{ExecuteOptions, Session};
use sparkla_runtime::sandbox::{sibling_binary, SandboxConfig, SandboxRuntime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The agent built in this workspace (`target/<triple>/debug/sparkla-agent`).
pub fn agent_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPARKLA_AGENT") {
        return Some(PathBuf::from(p));
    }
    sibling_binary("sparkla-agent")
}

/// `true`, after saying loudly why, when the real sandbox cannot run here.
pub fn skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED: {test}: the sandbox runtime needs root (CI runs as root)");
        return true;
    }
    if agent_path().is_none() || sibling_binary("sparkla-sandbox").is_none() {
        eprintln!(
            "SKIPPED: {test}: sparkla-agent or sparkla-sandbox is not built \
             (cargo build -p sparkla-agent -p sparkla-runtime, or cargo test --workspace)"
        );
        return true;
    }
    false
}

pub const UID_COUNT: u32 = 65_536;

/// Sessions per test runtime.
pub const ID_SLOTS: u32 = 16;

/// Test slots per process (0..SLOTS).
pub const SLOTS: u32 = 9;

/// A host id window per test, away from the runtime tests' (100_000_000 + …) and from
/// `sparkla execute`'s (400_000_000 + …), and (by pid) from the same tests run at the same
/// time from another checkout on this machine.
pub fn id_base(slot: u32) -> u32 {
    assert!(slot < SLOTS);
    let lane = std::process::id() % 32;
    3_500_000_000 + (lane * SLOTS + slot) * ID_SLOTS * UID_COUNT
}

/// The cgroup parent of a test's runtime (its own per process).
pub fn parent(name: &str) -> String {
    format!("sparkla-test-documents-{name}-{}", std::process::id())
}

/// A sandbox runtime of its own for one test.
pub fn runtime(name: &str, slot: u32) -> Arc<SandboxRuntime> {
    let config = SandboxConfig {
        launcher: sibling_binary("sparkla-sandbox"),
        agent: agent_path(),
        state_dir: PathBuf::from(format!("/run/sparkla-test/{}", parent(name))),
        cgroup_parent: parent(name),
        cgroup_nest: false,
        host_id_base: id_base(slot),
        id_slots: ID_SLOTS,
        ..Default::default()
    };
    Arc::new(SandboxRuntime::new(config).expect("sandbox runtime"))
}

pub fn options(input: &Path, name: &str, slot: u32) -> ExecuteOptions {
    let mut o = ExecuteOptions::new(
        input,
        Session::Given {
            runtime: runtime(name, slot),
            environment: None,
        },
    );
    o.progress = sparkla_documents::Progress::Never;
    o
}

/// Host processes in a uid range (a session's leftovers).
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
        if uid >= base && uid < base + count {
            out.push(format!("pid {pid} uid {uid}"));
        }
    }
    out
}

fn leftovers(name: &str, slot: u32) -> Vec<String> {
    let mut left = processes_in_uid_range(id_base(slot), ID_SLOTS * UID_COUNT);
    let parent = parent(name);
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for dir in [hierarchy.path().join(&parent)] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    left
}

/// Assert that the sessions of a test left no process and no cgroup behind (waiting up to
/// 5 s for the kernel to finish reaping), then remove the test's cgroup parents.
pub async fn assert_no_leftovers(name: &str, slot: u32) {
    let mut left = leftovers(name, slot);
    for _ in 0..250 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        left = leftovers(name, slot);
    }
    assert!(left.is_empty(), "left behind: {left:#?}");
    let parent = parent(name);
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join(&parent));
    }
    let _ = std::fs::remove_dir_all(format!("/run/sparkla-test/{parent}"));
}

/// The real interpreter with nbformat (Debian's python3-nbformat).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Validate a notebook with nbformat; panics with nbformat's message when invalid.
/// Returns false (after saying so loudly) when nbformat is not installed.
pub fn validate_notebook(path: &Path) -> bool {
    let has = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbformat"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has {
        eprintln!(
            "SKIPPED: nbformat validation of {}: python3-nbformat is not installed (apt-get install python3-nbformat)",
            path.display()
        );
        return false;
    }
    let out = std::process::Command::new(SYSTEM_PYTHON)
        .args([
            "-c",
            "import nbformat,sys; nbformat.validate(nbformat.read(sys.argv[1], as_version=4), version=4); print('valid')",
        ])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{} is not a valid notebook:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
