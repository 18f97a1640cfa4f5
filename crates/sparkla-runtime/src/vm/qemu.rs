//! The `qemu` runtime: each session is a `qemu-system-x86_64 -M microvm` VM booted from the
//! shared guest image ([`super::guest`]).
//!
//! * **Acceleration:** KVM when `/dev/kvm` works, else TCG. "Works" is tested once, when the
//!   runtime is made: QEMU is started paused (`-S`) with KVM; a QEMU that dies at once (as it
//!   does on hosts whose `/dev/kvm` exists but cannot run a guest) means TCG, and the log says
//!   so (`warn`). A KVM boot that still fails falls back to TCG for the rest of the runtime.
//! * **Devices:** the read-only `rootfs.ext4` and a per-session scratch drive (ext4, made with
//!   `mkfs.ext4 -d`, holding the session's environment variables for the init) as
//!   virtio-blk; a virtio-console port named [`super::AGENT_PORT_NAME`] whose
//!   chardev is a Unix socket `agent.sock` in the VM home, on which *this process listens*
//!   and QEMU connects (so there is no race with the agent's `ready` line); the kernel console
//!   (ttyS0) goes to `console.log` in the VM home, QEMU's own stderr to `qemu.log`.
//! * **Size:** vCPUs, memory, scratch and pids from the session's limits ([`super::VmShape`]).
//! * **Lifecycle:** the VM home is `<base>/vm-<server id>-<session>-<pid>-<n>` (default
//!   base `/tmp`) with `vmm.pid`; `stop` (and drop) kills QEMU and removes the home;
//!   [`QemuRuntime::sweep`] reclaims homes (and QEMUs) of this server id that a crashed
//!   server left.

use super::guest::GuestImage;
use super::{tail, VmInstance, VmShape};
use crate::{Instance, InstanceSpec, Limits, Runtime, RuntimeError, SweepReport};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

const RUNTIME: &str = "qemu";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if it works here, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// How the QEMU runtime is set up. [`QemuConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuConfig {
    /// Identifies this server's VM homes (for [`QemuRuntime::sweep`]).
    pub server_id: String,
    /// The QEMU binary (default `qemu-system-x86_64` on PATH).
    pub qemu: PathBuf,
    /// The guest image directory (default [`super::guest::default_dir`]).
    pub guest_dir: PathBuf,
    /// Where VM homes are made (default `/tmp`).
    pub base_dir: PathBuf,
    pub accel: Accel,
    /// Limits applied when the session's own limits leave one unset.
    pub default_limits: Limits,
    /// How long a VM may take to boot until QEMU connects to the agent socket and the agent
    /// is started (TCG on a loaded machine is slow).
    pub boot_timeout: Duration,
    /// Extra environment variables for every session.
    pub env: Vec<(String, String)>,
}

impl QemuConfig {
    /// Defaults: `qemu-system-x86_64`, the default guest directory, `/tmp`, `Accel::Auto`,
    /// 1 vCPU, 512 MiB, 256 processes, 256 MiB scratch.
    pub fn new(server_id: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            guest_dir: super::guest::default_dir(),
            base_dir: PathBuf::from("/tmp"),
            accel: Accel::Auto,
            default_limits: Limits {
                cpu_cores: Some(1.0),
                memory_bytes: Some(super::DEFAULT_MEMORY),
                pids: Some(256),
                scratch_bytes: Some(super::DEFAULT_SCRATCH),
            },
            boot_timeout: Duration::from_secs(120),
            env: Vec::new(),
        }
    }
}

/// Runs each session as a QEMU microvm.
#[derive(Debug)]
pub struct QemuRuntime {
    config: QemuConfig,
    image: GuestImage,
    kvm: AtomicBool,
}

/// Whether QEMU can run a KVM guest here: start it paused with KVM and see whether it
/// survives a moment (a broken `/dev/kvm` makes it abort at once).
pub async fn kvm_usable(qemu: &Path) -> Result<(), String> {
    super::kvm_accessible()?;
    let mut child = Command::new(qemu)
        .args(["-M", "microvm,accel=kvm", "-cpu", "host", "-m", "64"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
        .args(["-monitor", "none", "-serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    match tokio::time::timeout(Duration::from_millis(1500), child.wait()).await {
        Err(_) => {
            let _ = child.kill().await;
            Ok(())
        }
        Ok(status) => {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = s.read_to_string(&mut err).await;
            }
            Err(format!(
                "QEMU with KVM exited at once ({}): {}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                err.trim()
            ))
        }
    }
}

impl QemuRuntime {
    /// Check QEMU and the guest image, and choose the accelerator (see the module docs).
    pub async fn new(config: QemuConfig) -> Result<Self, RuntimeError> {
        let version = Command::new(&config.qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|e| RuntimeError::Unavailable {
                runtime: RUNTIME,
                reason: format!(
                    "cannot run {}: {e} (install Debian's qemu-system-x86)",
                    config.qemu.display()
                ),
            })?;
        let image = GuestImage::at(&config.guest_dir);
        image.check_qemu()?;
        let kvm = match config.accel {
            Accel::Tcg => false,
            Accel::Kvm => {
                kvm_usable(&config.qemu)
                    .await
                    .map_err(|reason| RuntimeError::Unavailable {
                        runtime: RUNTIME,
                        reason,
                    })?;
                true
            }
            Accel::Auto => match kvm_usable(&config.qemu).await {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(reason = %why, "KVM is not usable: the qemu runtime falls back to TCG (software emulation, much slower)");
                    false
                }
            },
        };
        tracing::info!(
            qemu = %String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or_default(),
            accel = if kvm { "kvm" } else { "tcg" },
            guest = %image.dir.display(),
            "qemu runtime ready"
        );
        Ok(Self {
            config,
            image,
            kvm: AtomicBool::new(kvm),
        })
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Whether VMs are started with KVM (else TCG).
    pub fn uses_kvm(&self) -> bool {
        self.kvm.load(Ordering::Relaxed)
    }

    /// The QEMU command line of a VM (public for tests and docs).
    pub fn command_line(&self, home: &Path, shape: &VmShape, kvm: bool) -> Vec<String> {
        let img = &self.image;
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init {}",
            shape.cmdline(&format!("port:{}", super::AGENT_PORT_NAME))
        );
        if !kvm {
            // Under TCG the microvm has no HPET or ACPI PM timer and calibrating the TSC
            // against the PIT fails, after which the guest's clock never ticks. TCG's TSC runs
            // at the host's TSC rate: tell the guest that rate.
            append.push_str(&format!(" tsc_early_khz={} tsc=reliable", host_tsc_khz()));
        }
        let h = |f: &str| home.join(f).to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "-M".into(),
            format!("microvm,accel={}", if kvm { "kvm" } else { "tcg" }),
            "-cpu".into(),
            if kvm { "host" } else { "max" }.into(),
            "-smp".into(),
            shape.vcpus.to_string(),
            "-m".into(),
            format!("{}M", shape.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
            "-name".into(),
            format!("sparkla,process=sparkla-vm:{}", h("")),
            "-kernel".into(),
            img.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            img.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            append,
            "-serial".into(),
            format!("file:{}", h("console.log")),
            "-drive".into(),
            format!(
                "id=root,file={},format=raw,if=none,readonly=on",
                img.rootfs.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-drive".into(),
            format!("id=scratch,file={},format=raw,if=none", h("scratch.ext4")),
            "-device".into(),
            "virtio-blk-device,drive=scratch".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={}", h("agent.sock")),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                super::AGENT_PORT_NAME
            ),
        ];
        if !kvm {
            // one TCG thread per vCPU where QEMU can
            args.push("-accel".into());
            args.push("tcg,thread=multi".into());
            // -M accel= and -accel must not both name the accelerator
            args[1] = "microvm".into();
        }
        args
    }

    async fn boot(
        &self,
        spec: &InstanceSpec,
        home: &Path,
        shape: &VmShape,
        kvm: bool,
    ) -> Result<(Child, tokio::net::UnixStream), String> {
        let sock = home.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener =
            UnixListener::bind(&sock).map_err(|e| format!("binding {}: {e}", sock.display()))?;
        let log = std::fs::File::create(home.join("qemu.log"))
            .map_err(|e| format!("creating qemu.log: {e}"))?;
        let started = Instant::now();
        let mut child = Command::new(&self.config.qemu)
            .args(self.command_line(home, shape, kvm))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.config.qemu.display()))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(home.join(super::PID_FILE), pid.to_string());
        }
        let accepted = tokio::select! {
            a = listener.accept() => a.map(|(s, _)| s).map_err(|e| format!("accepting QEMU's connection: {e}")),
            s = child.wait() => Err(format!(
                "QEMU exited before connecting ({}): {}",
                s.map(|s| s.to_string()).unwrap_or_default(),
                tail(&home.join("qemu.log"))
            )),
            _ = tokio::time::sleep(self.config.boot_timeout) => Err(format!(
                "QEMU did not connect within {:?}", self.config.boot_timeout
            )),
        };
        match accepted {
            Ok(stream) => {
                tracing::debug!(session_id = %spec.session_id, accel = if kvm { "kvm" } else { "tcg" }, ms = started.elapsed().as_millis() as u64, "qemu started");
                Ok((child, stream))
            }
            Err(e) => {
                let _ = child.kill().await;
                Err(e)
            }
        }
    }
}

/// The host's TSC rate in kHz (`cpu MHz` of /proc/cpuinfo; hosts with `constant_tsc` run
/// the TSC at that rate), else 2 GHz.
pub fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .filter(|k| *k > 100_000)
        .unwrap_or(2_000_000)
}

#[async_trait]
impl Runtime for QemuRuntime {
    fn name(&self) -> &'static str {
        RUNTIME
    }

    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError> {
        match environment {
            None | Some("") | Some("default") => self.image.check_qemu(),
            Some(name) => Err(RuntimeError::Environment {
                name: name.to_string(),
                reason: format!(
                    "the qemu runtime has one environment, the guest image in {} (built with `{}`)",
                    self.image.dir.display(),
                    super::guest::GUEST_BUILD_COMMAND
                ),
            }),
        }
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        self.prepare(spec.environment.as_deref()).await?;
        if !spec.mounts.is_empty() {
            return Err(RuntimeError::Refused(
                "the qemu runtime does not support volume mounts".into(),
            ));
        }
        if spec.network {
            return Err(RuntimeError::Refused(
                "the qemu runtime gives sessions no network".into(),
            ));
        }
        let shape = VmShape::from_limits(&spec.limits, &self.config.default_limits);
        let id = super::vm_id(&format!("{}-{}", self.config.server_id, spec.session_id));
        let home = super::create_home(&self.config.base_dir, &id)?;
        let fail = |home: &Path, reason: String| {
            let _ = std::fs::remove_dir_all(home);
            RuntimeError::Start {
                session_id: spec.session_id.clone(),
                reason,
            }
        };
        let mut env = self.config.env.clone();
        env.push(("SPARKLA_SESSION".into(), spec.session_id.clone()));
        env.extend(spec.env.iter().cloned());
        if let Err(e) = super::make_scratch(&home, shape.scratch_bytes, &env) {
            return Err(fail(&home, e.to_string()));
        }
        let kvm = self.uses_kvm();
        let booted = match self.boot(&spec, &home, &shape, kvm).await {
            Err(e) if kvm => {
                tracing::warn!(session_id = %spec.session_id, error = %e, "booting with KVM failed: falling back to TCG from now on");
                self.kvm.store(false, Ordering::Relaxed);
                self.boot(&spec, &home, &shape, false).await
            }
            other => other,
        };
        let (child, stream) = match booted {
            Ok(b) => b,
            Err(e) => return Err(fail(&home, e)),
        };
        let (r, w) = stream.into_split();
        Ok(Box::new(VmInstance::new(
            "qemu",
            "console.log",
            spec.session_id,
            home,
            child,
            (Box::new(r), Box::new(w)),
        )))
    }

    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        let prefix = format!("{}-", super::safe_id(&self.config.server_id));
        let base = self.config.base_dir.clone();
        tokio::task::spawn_blocking(move || super::sweep_homes(&base, &prefix))
            .await
            .map_err(|e| RuntimeError::io("sweeping VM homes", std::io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_shape() {
        let rt = QemuRuntime {
            config: QemuConfig::new("t"),
            image: GuestImage::at("/g"),
            kvm: AtomicBool::new(false),
        };
        let shape = VmShape::from_limits(
            &Limits {
                cpu_cores: Some(2.0),
                memory_bytes: Some(300 << 20),
                pids: Some(50),
                scratch_bytes: Some(64 << 20),
            },
            &Limits::default(),
        );
        let args = rt
            .command_line(Path::new("/tmp/vm-x"), &shape, false)
            .join(" ");
        for needle in [
            "-M microvm ",
            "-accel tcg",
            "-smp 2",
            "-m 300M",
            "file=/g/rootfs.ext4,format=raw,if=none,readonly=on",
            "file=/tmp/vm-x/scratch.ext4",
            "socket,id=agent,path=/tmp/vm-x/agent.sock",
            "name=sparkla.agent",
            "sparkla.listen=port:sparkla.agent",
            "sparkla.pids=50",
            "-kernel /g/vmlinuz",
            "-initrd /g/initrd.img",
            "-no-reboot",
            "tsc=reliable",
        ] {
            assert!(args.contains(needle), "{needle:?} missing from {args}");
        }
        let kvm = rt
            .command_line(Path::new("/tmp/vm-x"), &shape, true)
            .join(" ");
        assert!(kvm.contains("microvm,accel=kvm") && kvm.contains("-cpu host"));
    }
}
