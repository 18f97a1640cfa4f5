//! `sparkla-guest-init`: PID 1 of Sparkla's microVM guests (Firecracker and QEMU).
//!
//! One static binary, two stages:
//!
//! 1. **initramfs** (QEMU with Debian's cloud kernel, whose virtio drivers are modules): when
//!    `/sparkla-initramfs` exists it mounts devtmpfs, proc and sys, loads the modules listed in
//!    `/modules/order` with `finit_module(2)` (no kmod needed), waits for the drive labelled `sparkla-root`, mounts it
//!    read-only, moves `/dev`, `/proc` and `/sys` into it, switches root and executes
//!    `/sbin/sparkla-init` from the root filesystem (stage 2).
//! 2. **root filesystem** (Firecracker boots it directly with `init=/sbin/sparkla-init`):
//!    mounts proc, sys, dev, devpts, `/dev/shm` and `/tmp`, mounts the session's scratch drive
//!    (the ext4 drive labelled `sparkla-scratch`) as the home directory (tmpfs when there is none), brings up loopback,
//!    sets the hostname, reads the session's environment from `<home>/.sparkla/env` (removing
//!    it), then starts `sparkla-agent` as uid 1000 and reaps every orphan. When the agent
//!    exits, it reboots the VM, which ends the VMM (`qemu -no-reboot`, Firecracker `reboot=k`).
//!
//! Kernel command line parameters (all optional):
//! * `sparkla.listen=vsock:PORT` – the agent listens on vsock (Firecracker's hybrid vsock);
//! * `sparkla.listen=port:NAME` – the agent serves on the virtio-console port named NAME
//!   (its stdin/stdout; QEMU's `virtserialport,name=NAME`); the default is `port:sparkla.agent`;
//! * `sparkla.listen=serial:/dev/ttyS1` – the agent serves on a serial device;
//! * `sparkla.pids=N` – RLIMIT_NPROC of the session user;
//! * `sparkla.scratch=BYTES` – size of `/tmp` (and of the home tmpfs without scratch drive);
//! * `sparkla.hostname=NAME` (default `sparkla`).

#[cfg(target_os = "linux")]
fn main() {
    guest::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("sparkla-guest-init runs only inside a Linux guest");
    std::process::exit(2)
}

#[cfg(target_os = "linux")]
mod guest {
    use std::collections::HashMap;
    use std::ffi::CString;
    use std::path::Path;
    use std::time::{Duration, Instant};

    const HOME: &str = "/home/sparkla";
    const UID: u32 = 1000;

    fn log(msg: &str) {
        eprintln!("sparkla-init: {msg}");
    }

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL in path")
    }

    fn mount(src: &str, dst: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> bool {
        let _ = std::fs::create_dir_all(dst);
        let (s, d, t, o) = (c(src), c(dst), c(fstype), c(data));
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                s.as_ptr(),
                d.as_ptr(),
                if fstype.is_empty() {
                    std::ptr::null()
                } else {
                    t.as_ptr()
                },
                flags,
                if data.is_empty() {
                    std::ptr::null()
                } else {
                    o.as_ptr() as *const libc::c_void
                },
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                log(&format!("mount {src} on {dst} ({fstype}) failed: {e}"));
            }
            return false;
        }
        true
    }

    fn cmdline() -> HashMap<String, String> {
        std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.starts_with("sparkla."))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wait_for(path: &Path, timeout: Duration) -> bool {
        let start = Instant::now();
        while !path.exists() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn halt(why: &str) -> ! {
        log(why);
        // SAFETY: plain syscalls; PID 1 asks the kernel to reset the machine.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn main() {
        // SAFETY: no preconditions.
        if unsafe { libc::getpid() } != 1 {
            eprintln!("sparkla-guest-init must run as PID 1 of a microVM guest");
            std::process::exit(2);
        }
        if Path::new("/sparkla-initramfs").exists() {
            stage1();
        }
        stage2();
    }

    /// In the initramfs: load the virtio modules, mount the root drive, switch to it.
    fn stage1() -> ! {
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
        mount("proc", "/proc", "proc", 0, "");
        mount("sysfs", "/sys", "sysfs", 0, "");
        let order = std::fs::read_to_string("/modules/order").unwrap_or_default();
        for m in order.split_whitespace() {
            let path = format!("/modules/{m}.ko");
            match std::fs::File::open(&path) {
                Ok(f) => {
                    use std::os::fd::AsRawFd;
                    let empty = c("");
                    // SAFETY: finit_module on an open module file with empty parameters.
                    let r = unsafe {
                        libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0)
                    };
                    if r != 0 {
                        let e = std::io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            log(&format!("loading {m} failed: {e}"));
                        }
                    }
                }
                Err(e) => log(&format!("{path}: {e}")),
            }
            let _ = std::fs::remove_file(&path);
        }
        let start = Instant::now();
        let root = loop {
            if let Some(d) = find_by_label("sparkla-root") {
                break d;
            }
            if start.elapsed() > Duration::from_secs(20) {
                halt("no drive labelled sparkla-root appeared");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !mount(&root, "/newroot", "ext4", libc::MS_RDONLY, "") {
            halt("cannot mount the root drive");
        }
        for d in ["/dev", "/proc", "/sys"] {
            mount(d, &format!("/newroot{d}"), "", libc::MS_MOVE, "");
        }
        let _ = std::env::set_current_dir("/newroot");
        mount(".", "/", "", libc::MS_MOVE, "");
        let dot = c(".");
        // SAFETY: chroot into the moved root, as switch_root does.
        unsafe {
            libc::chroot(dot.as_ptr());
        }
        let _ = std::env::set_current_dir("/");
        let init = c("/sbin/sparkla-init");
        let argv = [init.as_ptr(), std::ptr::null()];
        // SAFETY: valid argv; on success it does not return.
        unsafe {
            libc::execv(init.as_ptr(), argv.as_ptr());
        }
        halt(&format!(
            "cannot execute /sbin/sparkla-init: {}",
            std::io::Error::last_os_error()
        ));
    }

    fn loopback_up() {
        // SAFETY: an ioctl on a fresh socket with a zeroed ifreq naming "lo".
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return;
            }
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                ifr.ifr_name[i] = *b as libc::c_char;
            }
            if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
                ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
            }
            libc::close(fd);
        }
    }

    /// The virtio block device (`/dev/vdX`) whose ext4 volume label is `label`. Drives are
    /// found by label, not by name: the order in which virtio-mmio devices are probed is
    /// the VMM's business.
    fn find_by_label(label: &str) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut names: Vec<String> = std::fs::read_dir("/sys/block")
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("vd"))
            .collect();
        names.sort();
        for n in names {
            let dev = format!("/dev/{n}");
            let Ok(mut f) = std::fs::File::open(&dev) else {
                continue;
            };
            // ext4 superblock at 1024; s_magic at +56 (0xEF53), s_volume_name at +120 (16 bytes)
            let mut sb = [0u8; 136];
            if f.seek(SeekFrom::Start(1024)).is_ok() && f.read_exact(&mut sb).is_ok() {
                let magic = u16::from_le_bytes([sb[56], sb[57]]);
                let name = &sb[120..136];
                let end = name.iter().position(|b| *b == 0).unwrap_or(16);
                if magic == 0xEF53 && &name[..end] == label.as_bytes() {
                    return Some(dev);
                }
            }
        }
        None
    }

    /// The device file of the virtio-console port named `name`.
    fn find_port(name: &str) -> Option<String> {
        for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
            let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            if n.trim() == name {
                return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
            }
        }
        None
    }

    /// In the root filesystem: set up the session and run the agent.
    fn stage2() -> ! {
        let rw = libc::MS_NOSUID | libc::MS_NODEV;
        mount(
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        );
        mount(
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        );
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
        mount(
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        );
        mount("tmpfs", "/dev/shm", "tmpfs", rw, "mode=1777,size=64m");
        let args = cmdline();
        let scratch: u64 = args
            .get("sparkla.scratch")
            .and_then(|s| s.parse().ok())
            .unwrap_or(256 << 20);
        mount(
            "tmpfs",
            "/tmp",
            "tmpfs",
            rw,
            &format!("mode=1777,size={scratch}"),
        );
        mount("tmpfs", "/run", "tmpfs", rw, "mode=0755,size=16m");
        if let Some(dev) = find_by_label("sparkla-scratch") {
            if !mount(&dev, HOME, "ext4", rw, "") {
                halt(&format!("cannot mount the scratch drive {dev}"));
            }
        } else {
            mount(
                "tmpfs",
                HOME,
                "tmpfs",
                rw,
                &format!("mode=0700,uid={UID},gid={UID},size={scratch}"),
            );
        }
        let host = args
            .get("sparkla.hostname")
            .map(String::as_str)
            .unwrap_or("sparkla");
        // SAFETY: a valid buffer and its length.
        unsafe {
            libc::sethostname(host.as_ptr() as *const libc::c_char, host.len());
        }
        loopback_up();

        // The session's environment, written by the host into the scratch drive.
        let mut env: Vec<(String, String)> = Vec::new();
        let env_file = format!("{HOME}/.sparkla/env");
        if let Ok(bytes) = std::fs::read(&env_file) {
            for kv in bytes.split(|b| *b == 0).filter(|kv| !kv.is_empty()) {
                let kv = String::from_utf8_lossy(kv);
                if let Some((k, v)) = kv.split_once('=') {
                    env.push((k.to_string(), v.to_string()));
                }
            }
            let _ = std::fs::remove_dir_all(format!("{HOME}/.sparkla"));
        }

        let listen = args
            .get("sparkla.listen")
            .cloned()
            .unwrap_or_else(|| "port:sparkla.agent".into());
        let mut agent_args = vec!["/sbin/sparkla-agent".to_string()];
        let mut stdio: Option<String> = None;
        if let Some(port) = listen.strip_prefix("vsock:") {
            agent_args.push("--listen".into());
            agent_args.push(format!("vsock:{port}"));
        } else if let Some(name) = listen.strip_prefix("port:") {
            let start = Instant::now();
            loop {
                if let Some(dev) = find_port(name) {
                    if wait_for(Path::new(&dev), Duration::from_secs(5)) {
                        stdio = Some(dev);
                        break;
                    }
                }
                if start.elapsed() > Duration::from_secs(20) {
                    halt(&format!("no virtio-console port named {name}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        } else if let Some(dev) = listen.strip_prefix("serial:") {
            stdio = Some(dev.to_string());
        } else {
            halt(&format!("bad sparkla.listen={listen}"));
        }
        let pids: Option<u64> = args.get("sparkla.pids").and_then(|s| s.parse().ok());
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        log(&format!(
            "starting the agent ({listen}) {} s after the kernel started",
            uptime.split_whitespace().next().unwrap_or("?")
        ));

        // SAFETY: fork in a single-threaded process; the child only prepares and execs.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            halt("fork failed");
        }
        if pid == 0 {
            exec_agent(&agent_args, stdio.as_deref(), pids, &env);
        }
        loop {
            let mut status = 0;
            // SAFETY: reaping any child.
            let r = unsafe { libc::waitpid(-1, &mut status, 0) };
            if r == pid {
                halt(&format!("the agent exited (status {status:#x})"));
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                halt("no children left");
            }
        }
    }

    fn exec_agent(
        args: &[String],
        stdio: Option<&str>,
        pids: Option<u64>,
        env: &[(String, String)],
    ) -> ! {
        // SAFETY: runs in the freshly forked child only; every call is a plain syscall.
        unsafe {
            libc::setsid();
            if let Some(dev) = stdio {
                let d = c(dev);
                let fd = libc::open(d.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
                if fd < 0 {
                    log(&format!("open {dev}: {}", std::io::Error::last_os_error()));
                    libc::_exit(1);
                }
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                if fd > 2 {
                    libc::close(fd);
                }
            }
            if let Some(n) = pids {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                libc::setrlimit(libc::RLIMIT_NPROC, &lim);
            }
            let _ = std::os::unix::fs::chown(HOME, Some(UID), Some(UID));
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(UID) != 0
                || libc::setuid(UID) != 0
            {
                log("dropping to uid 1000 failed");
                libc::_exit(1);
            }
        }
        let _ = std::env::set_current_dir(HOME);
        let mut vars: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), HOME.into()),
            ("USER".into(), "sparkla".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("MPLCONFIGDIR".into(), format!("{HOME}/.config/matplotlib")),
        ];
        vars.extend(env.iter().cloned());
        let cargs: Vec<CString> = args.iter().map(|a| c(a)).collect();
        let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let cenv: Vec<CString> = vars
            .iter()
            .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
            .collect();
        let mut envp: Vec<*const libc::c_char> = cenv.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: valid argv/envp arrays terminated by null.
        unsafe {
            libc::execve(cargs[0].as_ptr(), argv.as_ptr(), envp.as_ptr());
        }
        log(&format!(
            "cannot execute {}: {}",
            args[0],
            std::io::Error::last_os_error()
        ));
        // SAFETY: leaving the child without running destructors.
        unsafe { libc::_exit(127) }
    }
}
