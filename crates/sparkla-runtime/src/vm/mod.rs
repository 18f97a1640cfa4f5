//! MicroVM runtimes: each session is a virtual machine booted from one shared guest image.
//!
//! * [`guest`]: the guest image (`rootfs.ext4` with the static agent and
//!   `sparkla-guest-init`, Debian's cloud kernel and a tiny initramfs for QEMU), built by
//!   `sparkla guest build` through [`guest::build`].
//! * [`qemu`]: `qemu-system-x86_64 -M microvm`, KVM when it works, else TCG (said in the log);
//!   the agent is reached over a virtio-console port backed by a Unix socket.
//! * [`firecracker`]: the `firecracker` VMM driven over its API socket
//!   ([`firecracker::api`]), the agent reached through Firecracker's hybrid vsock
//!   ([`vsock`]); snapshot/restore for fast starts.
//!
//! Both give each VM a home directory `/tmp/vm-<id>` (configurable base) holding its sockets,
//! logs and scratch drive, with the VMM's pid in `vmm.pid`. Stopping a VM kills the VMM and
//! removes its home; [`sweep_homes`] reclaims the homes (and VMMs) a crashed server left.
//!
//! The guest's size comes from the session's limits: `memory_bytes` is the VM's memory,
//! `cpu_cores` rounded up its vCPUs, `pids` the session user's `RLIMIT_NPROC`, and
//! `scratch_bytes` the size of its scratch drive (home) and `/tmp`.

pub mod firecracker;
pub mod guest;
pub mod qemu;
pub mod vsock;

use crate::{BoxRead, BoxWrite, Instance, InstanceState, Limits, RuntimeError, SweepReport};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Child;

/// Prefix of VM home directories (`/tmp/vm-<id>`, as in the original README).
pub const HOME_PREFIX: &str = "vm-";
/// The file in a VM home holding the VMM's pid.
pub const PID_FILE: &str = "vmm.pid";
/// The vsock port the agent listens on inside Firecracker guests.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The name of the virtio-console port of the agent in QEMU guests.
pub const AGENT_PORT_NAME: &str = "sparkla.agent";

/// Default VM size when a session sets no limits.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
pub const DEFAULT_SCRATCH: u64 = 256 << 20;

/// The guest's shape derived from a session's limits (and the runtime's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub scratch_bytes: u64,
    pub pids: Option<u64>,
}

impl VmShape {
    pub fn from_limits(limits: &Limits, defaults: &Limits) -> Self {
        let cores = limits.cpu_cores.or(defaults.cpu_cores).unwrap_or(1.0);
        let memory = limits
            .memory_bytes
            .or(defaults.memory_bytes)
            .unwrap_or(DEFAULT_MEMORY);
        Self {
            vcpus: (cores.ceil() as u32).clamp(1, 32),
            // at least 128 MiB: the kernel and the agent need some room
            memory_mib: (memory >> 20).max(128),
            scratch_bytes: limits
                .scratch_bytes
                .or(defaults.scratch_bytes)
                .unwrap_or(DEFAULT_SCRATCH)
                .max(16 << 20),
            pids: limits.pids.or(defaults.pids),
        }
    }

    /// The `sparkla.*` kernel command-line parameters read by `sparkla-guest-init`.
    pub fn cmdline(&self, listen: &str) -> String {
        let mut s = format!(
            "sparkla.listen={listen} sparkla.scratch={}",
            self.scratch_bytes
        );
        if let Some(p) = self.pids {
            s.push_str(&format!(" sparkla.pids={p}"));
        }
        s
    }
}

/// A file-name-safe form of a session id (at most 40 characters).
pub fn safe_id(session_id: &str) -> String {
    session_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

/// A unique VM id for a session: `<safe session id>-<pid>-<seq>`.
pub fn vm_id(session_id: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        safe_id(session_id),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Create a VM home `<base>/vm-<id>` (mode 0700).
pub fn create_home(base: &Path, id: &str) -> Result<PathBuf, RuntimeError> {
    use std::os::unix::fs::DirBuilderExt;
    let home = base.join(format!("{HOME_PREFIX}{id}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&home)
        .map_err(|e| RuntimeError::io(format!("creating VM home {}", home.display()), e))?;
    Ok(home)
}

/// Create the session's scratch drive: an ext4 image of `bytes` (sparse) holding
/// `.sparkla/env` (the session's environment variables, NUL-separated), owned by uid 1000.
pub fn make_scratch(
    home: &Path,
    bytes: u64,
    env: &[(String, String)],
) -> Result<PathBuf, RuntimeError> {
    let seed = home.join("scratch-seed");
    let dot = seed.join(".sparkla");
    std::fs::create_dir_all(&dot).map_err(|e| RuntimeError::io("creating the scratch seed", e))?;
    let mut data = Vec::new();
    for (k, v) in env {
        data.extend_from_slice(format!("{k}={v}").as_bytes());
        data.push(0);
    }
    std::fs::write(dot.join("env"), data)
        .map_err(|e| RuntimeError::io("writing the session environment", e))?;
    let image = home.join("scratch.ext4");
    let out = std::process::Command::new("mkfs.ext4")
        // no journal: the drive lives as long as the session
        .args([
            "-q",
            "-F",
            "-L",
            "sparkla-scratch",
            "-m",
            "0",
            "-O",
            "^has_journal",
        ])
        .args(["-E", "root_owner=1000:1000,lazy_itable_init=1"])
        .arg("-d")
        .arg(&seed)
        .arg(&image)
        .arg(format!("{}k", bytes / 1024))
        .output()
        .map_err(|e| RuntimeError::io("running mkfs.ext4 (install e2fsprogs)", e))?;
    let _ = std::fs::remove_dir_all(&seed);
    if !out.status.success() {
        return Err(RuntimeError::io(
            "making the scratch drive",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(image)
}

/// Whether the process `pid` is alive and its command line mentions `needle` (so that a
/// recycled pid is never killed by mistake).
pub fn process_mentions(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        })
        .unwrap_or(false)
}

/// Kill the VMM whose pid is recorded in `home` (if it still runs a VMM of this home) and
/// wait for it to be gone (it may be a child of this process: reap it then).
pub fn kill_vmm(pid: i32, home: &Path) -> bool {
    let needle = home.to_string_lossy().to_string();
    if !process_mentions(pid, &needle) {
        return false;
    }
    // SAFETY: plain syscall; the pid was checked to be this home's VMM.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    for _ in 0..500 {
        // SAFETY: reap if it is our child; harmless otherwise.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
        if !process_mentions(pid, &needle) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Reclaim VM homes under `base` whose name starts with `vm-<prefix>`: kill the VMM
/// recorded in each (if it still runs with that home on its command line) and remove the
/// directory. `prefix` "" sweeps all VM homes under `base`.
pub fn sweep_homes(base: &Path, prefix: &str) -> SweepReport {
    let mut report = SweepReport::default();
    let Ok(entries) = std::fs::read_dir(base) else {
        return report;
    };
    let want = format!("{HOME_PREFIX}{prefix}");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(&want) || !e.path().is_dir() {
            continue;
        }
        let home = e.path();
        if let Some(pid) = std::fs::read_to_string(home.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if kill_vmm(pid, &home) {
                report.processes += 1;
                tracing::info!(home = %home.display(), pid, "swept a leftover VMM");
            }
        }
        if std::fs::remove_dir_all(&home).is_ok() {
            report.directories += 1;
            tracing::info!(home = %home.display(), "swept a leftover VM home");
        }
    }
    report
}

/// Whether `/dev/kvm` can be opened read-write by this process.
pub fn kvm_accessible() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("/dev/kvm does not exist (no KVM on this host: enable virtualization, or nested virtualization in the VM this runs in)".into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "no read/write access to /dev/kvm ({e}); grant it with `sudo setfacl -m u:$USER:rw /dev/kvm` (or add the user to the kvm group)"
        )),
        Err(e) => Err(format!("cannot open /dev/kvm: {e}")),
    }
}

/// Count the guest kernel's OOM kills in a console log.
pub fn oom_kills_in(console_log: &Path) -> u64 {
    std::fs::read(console_log)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .matches("Out of memory: Killed process")
                .count() as u64
        })
        .unwrap_or(0)
}

/// The last lines of a log file, for error messages.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// One session's VM, whichever VMM runs it: the VMM process, the VM's home directory and
/// the byte stream to the agent inside.
pub struct VmInstance {
    /// `qemu` or `firecracker`, for messages.
    vmm: &'static str,
    /// The guest console's log in the home, where OOM kills are counted.
    console: &'static str,
    session_id: String,
    home: Option<PathBuf>,
    child: tokio::sync::Mutex<Child>,
    exited: std::sync::Mutex<Option<String>>,
    /// In a mutex only to make the instance `Sync`.
    stream: std::sync::Mutex<Option<(BoxRead, BoxWrite)>>,
}

impl VmInstance {
    pub(crate) fn new(
        vmm: &'static str,
        console: &'static str,
        session_id: String,
        home: PathBuf,
        child: Child,
        stream: (BoxRead, BoxWrite),
    ) -> Self {
        Self {
            vmm,
            console,
            session_id,
            home: Some(home),
            child: tokio::sync::Mutex::new(child),
            exited: std::sync::Mutex::new(None),
            stream: std::sync::Mutex::new(Some(stream)),
        }
    }

    /// The VM's home directory (until stopped).
    pub fn home(&self) -> Option<&Path> {
        self.home.as_deref()
    }
}

#[async_trait]
impl Instance for VmInstance {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.stream.get_mut().map(Option::take).unwrap_or(None)
    }

    async fn state(&self) -> InstanceState {
        if let Some(reason) = self.exited.lock().expect("exited lock").clone() {
            return InstanceState::Exited { reason };
        }
        let mut child = self.child.lock().await;
        match child.try_wait() {
            Ok(None) => InstanceState::Running,
            Ok(Some(status)) => {
                let reason = format!("the VM ended ({} {status})", self.vmm);
                *self.exited.lock().expect("exited lock") = Some(reason.clone());
                InstanceState::Exited { reason }
            }
            Err(e) => InstanceState::Exited {
                reason: format!("VM state unknown: {e}"),
            },
        }
    }

    async fn oom_kills(&self) -> u64 {
        self.home
            .as_ref()
            .map(|h| oom_kills_in(&h.join(self.console)))
            .unwrap_or(0)
    }

    async fn stop(&mut self) -> Result<(), RuntimeError> {
        self.take_stream();
        {
            let mut child = self.child.lock().await;
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
        self.exited
            .lock()
            .expect("exited lock")
            .get_or_insert_with(|| "stopped".into());
        if let Some(home) = self.home.take() {
            if let Err(e) = std::fs::remove_dir_all(&home) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(RuntimeError::io(format!("removing {}", home.display()), e));
                }
            }
        }
        tracing::debug!(session_id = %self.session_id, vmm = self.vmm, "VM stopped");
        Ok(())
    }
}

impl Drop for VmInstance {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // SIGKILL through tokio's handle (which reaps it): never a raw pid that may
            // have been reaped and reused.
            let _ = self.child.get_mut().start_kill();
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_from_limits() {
        let s = VmShape::from_limits(
            &Limits {
                cpu_cores: Some(1.5),
                memory_bytes: Some(256 << 20),
                pids: Some(100),
                scratch_bytes: None,
            },
            &Limits::default(),
        );
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_mib, 256);
        assert_eq!(s.scratch_bytes, DEFAULT_SCRATCH);
        assert_eq!(
            s.cmdline("vsock:1024"),
            format!("sparkla.listen=vsock:1024 sparkla.scratch={DEFAULT_SCRATCH} sparkla.pids=100")
        );
        let d = VmShape::from_limits(&Limits::default(), &Limits::default());
        assert_eq!((d.vcpus, d.memory_mib), (1, 512));
    }

    #[test]
    fn ids_are_safe() {
        assert_eq!(safe_id("a/b c-1"), "a_b_c-1");
        assert!(vm_id("x").starts_with("x-"));
        assert_ne!(vm_id("x"), vm_id("x"));
    }

    #[test]
    fn sweep_removes_homes_and_only_matching_ones() {
        let base = tempfile::tempdir().unwrap();
        let a = create_home(base.path(), "t1-a").unwrap();
        std::fs::write(a.join(PID_FILE), "999999999").unwrap();
        create_home(base.path(), "other").unwrap();
        let r = sweep_homes(base.path(), "t1-");
        assert_eq!(r.directories, 1);
        assert_eq!(
            r.processes, 0,
            "a pid that runs no VMM of that home is never killed"
        );
        assert!(!a.exists());
        assert!(base.path().join("vm-other").exists());
    }
}
