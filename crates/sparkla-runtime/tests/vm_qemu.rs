//! The real guest path under QEMU: build (or reuse) the guest image, boot it with the qemu
//! runtime (KVM if it works, else TCG), and run the runtime conformance suite against it:
//! python, bash and javascript in the guest, state across executions, a memory limit by VM
//! size, background processes gone at end. Then check nothing is left: no QEMU process, no
//! VM home. Four boots in all (one per conformance check).
//!
//! Needs root (the image build: mmdebstrap, mkfs.ext4 -d keeping owners), qemu-system-x86_64,
//! mmdebstrap and the static agent; otherwise it prints SKIPPED and why. The image is
//! cached (see `sparkla_runtime::vm::guest`); set SPARKLA_GUEST_DIR to use a prebuilt one.

mod common;

/// Say loudly that something was skipped: straight to the process's stderr, past libtest's
/// output capture, so that it shows even when the test passes.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

use common::conformance;
use sparkla_runtime::vm::guest::{self, BuildOptions};
use sparkla_runtime::vm::qemu::{Accel, QemuConfig, QemuRuntime};
use sparkla_runtime::Runtime;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn on_path(p: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

fn skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("building the guest image needs root (CI runs as root)".into());
    }
    if !on_path("qemu-system-x86_64") {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    if common::agent_path().is_none() {
        return Some("sparkla-agent is not built (cargo build -p sparkla-agent)".into());
    }
    let guest_dir = std::env::var_os("SPARKLA_GUEST_DIR");
    if guest_dir.is_none() && !on_path("mmdebstrap") {
        return Some(
            "mmdebstrap is not installed (apt-get install mmdebstrap) and no SPARKLA_GUEST_DIR"
                .into(),
        );
    }
    None
}

/// Build the guest image (cached) with this workspace's agent and init.
pub async fn guest_image() -> PathBuf {
    let out = guest::default_dir();
    let started = Instant::now();
    let image = guest::build(&BuildOptions {
        out: Some(out.clone()),
        agent: common::agent_path(),
        init: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparkla-guest-init"))),
        ..Default::default()
    })
    .await
    .expect("building the guest image");
    eprintln!(
        "guest image in {} ready in {:.1} s",
        image.dir.display(),
        started.elapsed().as_secs_f64()
    );
    out
}

fn qemus_under(base: &Path) -> Vec<String> {
    let needle = base.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains("qemu-system") && c.contains(&needle) {
                out.push(format!("pid {pid}: {c}"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runtime_passes_the_conformance_suite() {
    if let Some(why) = skip_reason() {
        skipped(&format!("qemu_runtime_passes_the_conformance_suite: {why}"));
        return;
    }
    let guest_dir = guest_image().await;
    let base = tempfile::Builder::new()
        .prefix("sparkla-test-qemu-")
        .tempdir()
        .unwrap();
    let mut config = QemuConfig::new("tq");
    config.guest_dir = guest_dir;
    config.base_dir = base.path().to_path_buf();
    config.accel = Accel::Auto;
    let rt = QemuRuntime::new(config).await.expect("qemu runtime");
    eprintln!(
        "qemu runtime uses {}",
        if rt.uses_kvm() {
            "KVM"
        } else {
            "TCG (KVM is not usable here)"
        }
    );

    // A leftover of a crashed server is swept; a home of another server id is not.
    let leftover = base.path().join("vm-tq-crashed-1-0");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("vmm.pid"), "999999999").unwrap();
    let foreign = base.path().join("vm-other-1-0");
    std::fs::create_dir_all(&foreign).unwrap();
    let swept = rt.sweep().await.unwrap();
    assert_eq!(swept.directories, 1, "{swept:?}");
    assert!(!leftover.exists() && foreign.exists());
    std::fs::remove_dir_all(&foreign).unwrap();

    // Begin → ready, timed, and the transport/guest facts the suite does not check.
    let t = Instant::now();
    let (inst, client) = conformance::begin(&rt, conformance::spec("boot"))
        .await
        .expect("begin");
    let boot = t.elapsed();
    let ready = client.ready_info().unwrap();
    let info = conformance::exec(
        &client,
        "bash",
        "echo $(id -u) $(hostname) $(nproc) $HOME; grep -c . /proc/mounts >/dev/null && awk '$2==\"/\"{print $4}' /proc/mounts | cut -d, -f1; echo $SPARKLA_SESSION",
    )
    .await;
    let text = conformance::text(&info);
    eprintln!(
        "boot (start → agent ready): {:.2} s; agent pid {} in the guest; {text:?}",
        boot.as_secs_f64(),
        ready.pid
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000 sparkla 1 /home/sparkla", "{text}");
    assert_eq!(lines[1], "ro", "root filesystem is read-only: {text}");
    assert_eq!(
        lines[2], "boot",
        "session environment reached the agent: {text}"
    );
    let write = conformance::exec(
        &client,
        "bash",
        "touch /usr/x 2>&1 | grep -c 'Read-only'; echo hi > ~/f && cat ~/f",
    )
    .await;
    assert_eq!(conformance::text(&write), "1\nhi\n", "{write}");
    let home = base
        .path()
        .read_dir()
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("vm-tq-boot"))
        .map(|e| e.path())
        .expect("a VM home for the session");
    for f in [
        "agent.sock",
        "console.log",
        "scratch.ext4",
        "vmm.pid",
        "qemu.log",
    ] {
        assert!(home.join(f).exists(), "{f} missing from {}", home.display());
    }
    let console = std::fs::read_to_string(home.join("console.log")).unwrap_or_default();
    let init_line = console
        .lines()
        .find(|l| l.contains("starting the agent"))
        .unwrap_or("(no init line in console.log)");
    eprintln!("guest side: {init_line}");
    assert_eq!(qemus_under(base.path()).len(), 1);
    conformance::end(inst, client).await;
    assert!(!home.exists(), "stop removed the VM home");

    conformance::run_all(&rt, "tq").await;

    // Nothing left: no QEMU, no VM home.
    let mut left = qemus_under(base.path());
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        left = qemus_under(base.path());
    }
    assert!(left.is_empty(), "QEMU processes left: {left:#?}");
    let homes: Vec<_> = base
        .path()
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(homes.is_empty(), "VM homes left: {homes:?}");
}
