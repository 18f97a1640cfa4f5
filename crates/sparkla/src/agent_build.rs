//! `cargo run --release -- serve` on a fresh checkout builds only the `sparkla` binary, but
//! every session needs the static `sparkla-agent` beside it (and a guest image needs
//! `sparkla-guest-init`). When such a binary is missing and this process was started by
//! cargo (which sets `CARGO`), build it once, with the same profile, so that the README's
//! one command is enough.

use anyhow::Context;
use std::path::Path;

/// Make sure the workspace binary `name` sits next to this one, building it with
/// `cargo build <cargo_args>` when running under cargo.
pub fn ensure_built(name: &str, cargo_args: &[&str]) -> anyhow::Result<()> {
    if name == "sparkla-agent" && std::env::var_os("SPARKLA_AGENT").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot locate the sparkla binary")?;
    let Some(dir) = exe.parent() else {
        return Ok(());
    };
    if dir.join(name).is_file() {
        return Ok(());
    }
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(()); // not under cargo: the runtime reports the missing agent clearly
    };
    let release = dir.file_name().and_then(|n| n.to_str()) == Some("release");
    tracing::info!("{name} is not built yet: building it now (first run only)");
    let mut cmd = std::process::Command::new(cargo);
    cmd.arg("build").args(cargo_args);
    if release {
        cmd.arg("--release");
    }
    if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR") {
        // crates/sparkla -> the workspace root
        if let Some(root) = Path::new(&manifest).parent().and_then(Path::parent) {
            cmd.current_dir(root);
        }
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build sparkla-agent")?;
    anyhow::ensure!(
        status.success(),
        "building sparkla-agent failed ({status}); build it with `cargo build --release -p sparkla-agent`"
    );
    Ok(())
}
