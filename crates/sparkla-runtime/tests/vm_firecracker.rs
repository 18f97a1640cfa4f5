//! The runtime conformance suite against real Firecracker, cold boots and snapshot restores.
//!
//! Runs only where it can: `/dev/kvm` read/write, `firecracker` on PATH, root (the image
//! build), and a Firecracker guest kernel (`$SPARKLA_FC_KERNEL`, else `vmlinux` in the guest
//! directory). Everywhere else it prints SKIPPED and why. (On the development machine of
//! this project /dev/kvm cannot boot a guest and Firecracker is not installed: the
//! Firecracker runtime is verified there only against the contract, tests/firecracker_contract.rs.)

mod common;

/// Say loudly that something was skipped: straight to the process's stderr, past libtest's
/// output capture, so that it shows even when the test passes.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

use common::conformance;
use sparkla_runtime::vm::firecracker::{FirecrackerConfig, FirecrackerRuntime};
use sparkla_runtime::vm::guest::{self, BuildOptions};
use std::path::PathBuf;
use std::time::Instant;

fn kernel() -> PathBuf {
    std::env::var_os("SPARKLA_FC_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest::default_dir().join("vmlinux"))
}

async fn skip_reason() -> Option<String> {
    if let Err(why) = sparkla_runtime::vm::kvm_accessible() {
        return Some(format!("KVM is not accessible: {why}"));
    }
    // /dev/kvm may open and still be unable to run a guest (as on this project's
    // development machine): where QEMU is installed, ask it.
    let qemu = std::path::Path::new("qemu-system-x86_64");
    if let Err(why) = sparkla_runtime::vm::qemu::kvm_usable(qemu).await {
        if !why.starts_with("cannot run") {
            return Some(format!("KVM cannot run a guest here: {why}"));
        }
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("firecracker").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Some("firecracker is not on PATH".into());
    }
    if !common::is_root() {
        return Some("building the guest image needs root".into());
    }
    if common::agent_path().is_none() {
        return Some("sparkla-agent is not built".into());
    }
    if !kernel().is_file() {
        return Some(format!(
            "no Firecracker guest kernel at {} (set SPARKLA_FC_KERNEL to a vmlinux with virtio-mmio cmdline devices, ext4 and vsock built in)",
            kernel().display()
        ));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_runtime_passes_the_conformance_suite() {
    if let Some(why) = skip_reason().await {
        skipped(&format!(
            "firecracker_runtime_passes_the_conformance_suite: {why}"
        ));
        skipped("the Firecracker runtime was tested only against its API contract here");
        return;
    }
    let image = guest::build(&BuildOptions {
        agent: common::agent_path(),
        init: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparkla-guest-init"))),
        ..Default::default()
    })
    .await
    .expect("guest image");
    let base = tempfile::Builder::new()
        .prefix("sparkla-test-fc-")
        .tempdir()
        .unwrap();
    for snapshots in [false, true] {
        let mut c = FirecrackerConfig::new(if snapshots { "tfs" } else { "tfc" });
        c.kernel = kernel();
        c.rootfs = image.rootfs.clone();
        c.base_dir = base.path().to_path_buf();
        c.snapshots = snapshots;
        let rt = FirecrackerRuntime::new(c).expect("firecracker runtime");
        let t = Instant::now();
        let (inst, client) = conformance::begin(&rt, conformance::spec("first"))
            .await
            .expect("begin");
        eprintln!(
            "firecracker (snapshots: {snapshots}) first begin → ready: {:?}",
            t.elapsed()
        );
        conformance::end(inst, client).await;
        let t = Instant::now();
        let (inst, client) = conformance::begin(&rt, conformance::spec("second"))
            .await
            .expect("begin");
        eprintln!(
            "firecracker (snapshots: {snapshots}) second begin → ready: {:?}",
            t.elapsed()
        );
        conformance::end(inst, client).await;
        if !snapshots {
            conformance::run_all(&rt, "tfc").await;
        }
        use sparkla_runtime::Runtime;
        rt.sweep().await.unwrap();
    }
    let left: Vec<_> = base
        .path()
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "VM homes left: {left:?}");
}
