//! The sandbox launcher: a small single-threaded program (`sparkla-sandbox`) that the
//! runtime spawns for each session. It reads a [`LaunchSpec`] from the environment variable
//! [`SPEC_ENV`], joins the session's cgroup, and clones a child into new user, pid, mount,
//! network, ipc, uts and cgroup namespaces. While the child waits, the launcher (root on the
//! host) writes the child's uid/gid maps (an unprivileged host range, never host root) and
//! starts slirp4netns if the session may use the network. The child then builds its root
//! filesystem on a tmpfs, pivots into it, drops to an unprivileged uid with no capabilities,
//! sets `no_new_privs`, installs the seccomp filter and execs the agent as PID 1 of its pid
//! namespace. The agent's stdin/stdout are the launcher's (inherited).
//!
//! The launcher reports on file descriptor 3: `ok <pid>\n` once the agent was exec'd, or
//! `error: <message>\n`. Then it waits for the child and exits with its status. Namespace
//! setup must not run in a fork of the multi-threaded server, which is why this is a
//! separate process.

use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable holding the JSON [`LaunchSpec`].
pub const SPEC_ENV: &str = "SPARKLA_SANDBOX_SPEC";
/// The environment variable naming the cgroup parent a launcher belongs to (for sweeps).
pub const GROUP_ENV: &str = "SPARKLA_SANDBOX_GROUP";
/// The file descriptor on which the launcher reports.
pub const STATUS_FD: RawFd = 3;
/// Where the agent is mounted inside the sandbox.
pub const AGENT_PATH: &str = "/.sparkla/agent";
/// Exit status of the launcher when setting up the sandbox failed.
pub const SETUP_FAILED: i32 = 125;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
}

/// Everything the launcher needs; built by the runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub session_id: String,
    pub hostname: String,
    /// An empty host directory used as mount point of the new root, in the private mount
    /// namespace only (shared by all sessions; nothing is written to it on the host).
    pub root_mountpoint: PathBuf,
    /// A complete root filesystem (environment directory); `None`: host system directories.
    pub rootfs: Option<PathBuf>,
    /// With the host's system directories: a prepared /etc (see [`prepare_etc_skeleton`]),
    /// bound read-only in one mount. `None`: the needed host files are bound one by one.
    #[serde(default)]
    pub etc_skeleton: Option<PathBuf>,
    /// The agent binary on the host (static); mounted read-only at [`AGENT_PATH`].
    pub agent: PathBuf,
    /// Debug/test mode: exec this command (inside the sandbox) instead of the agent.
    pub command: Option<Vec<String>>,
    /// Size of the writable scratch tmpfs (home, /tmp, /dev/shm) in bytes.
    pub scratch_bytes: u64,
    /// Host uid/gid that uid/gid 0 inside maps to; `id_count` ids are mapped.
    pub host_id_base: u32,
    pub id_count: u32,
    /// The uid/gid the session runs as inside.
    pub inner_id: u32,
    /// Outbound network through slirp4netns (host loopback disabled).
    pub network: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    /// `cgroup.procs` files to join before cloning.
    pub cgroup_procs: Vec<PathBuf>,
    /// Environment of the agent (complete).
    pub env: Vec<(String, String)>,
    pub seccomp: bool,
}

type R<T> = Result<T, String>;

/// `SPARKLA_SANDBOX_TRACE=1` in the launcher's environment prints the time of each setup
/// phase to stderr (for diagnosing start-up cost).
fn trace(phase: &str) {
    use std::sync::OnceLock;
    static START: OnceLock<Option<std::time::Instant>> = OnceLock::new();
    let start = START.get_or_init(|| {
        std::env::var_os("SPARKLA_SANDBOX_TRACE").map(|_| std::time::Instant::now())
    });
    if let Some(t) = start {
        eprintln!(
            "sparkla-sandbox[{}] {:>8.3} ms {phase}",
            std::process::id(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}

fn cstr(p: impl AsRef<[u8]>) -> CString {
    CString::new(p.as_ref().to_vec()).unwrap_or_else(|_| CString::new("?").unwrap())
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> R<()> {
    if ret < 0 {
        Err(format!("{}: {}", what(), errno()))
    } else {
        Ok(())
    }
}

/// For binaries that double as the launcher (e.g. `sparkla`): call first thing in `main`,
/// before any thread is started. Runs the launcher and never returns if this process was
/// spawned as one; returns otherwise.
pub fn run_if_requested() {
    if std::env::var_os(SPEC_ENV).is_some() {
        main()
    }
}

/// Entry point of the launcher binary. Never returns.
pub fn main() -> ! {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            report(&format!("error: {e}"));
            eprintln!("sparkla-sandbox: {e}");
            SETUP_FAILED
        }
    };
    std::process::exit(code)
}

fn report(line: &str) {
    // SAFETY: STATUS_FD is given to us by the runtime; if it is not open the write fails.
    let mut f = unsafe { fs::File::from_raw_fd(STATUS_FD) };
    let _ = f.write_all(format!("{line}\n").as_bytes());
    drop(f); // closes it: the runtime sees EOF after the line.
}

fn pipe() -> R<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        || "pipe2".into(),
    )?;
    Ok((fds[0], fds[1]))
}

fn run() -> R<i32> {
    trace("start");
    // SAFETY: plain prctl calls.
    unsafe {
        // Die with the server (the thread that spawned us).
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    // The status fd must not leak into the sandbox.
    // SAFETY: fcntl on a descriptor number.
    unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let raw = std::env::var(SPEC_ENV).map_err(|_| format!("{SPEC_ENV} is not set"))?;
    let spec: LaunchSpec =
        serde_json::from_str(&raw).map_err(|e| format!("bad {SPEC_ENV}: {e}"))?;

    // Join the session's cgroup: everything started from here on is inside it.
    let me = std::process::id().to_string();
    for f in &spec.cgroup_procs {
        fs::write(f, &me).map_err(|e| format!("joining cgroup {}: {e}", f.display()))?;
    }

    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: a fork-like clone (no new stack) in a single-threaded process; the child only
    // runs `child()` and then execs or exits.
    trace("cgroup joined");
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    } as libc::pid_t;
    if pid < 0 {
        return Err(format!("clone: {}", errno()));
    }
    if pid == 0 {
        // SAFETY: closing our copies of the parent's pipe ends.
        unsafe {
            libc::close(go_w);
            libc::close(err_r);
        }
        let e = child(&spec, go_r).unwrap_err();
        // SAFETY: writing to our error pipe, then exiting without running destructors.
        unsafe {
            let b = e.as_bytes();
            libc::write(err_w, b.as_ptr().cast(), b.len());
            libc::_exit(SETUP_FAILED);
        }
    }
    // SAFETY: closing the child's pipe ends in the parent.
    unsafe {
        libc::close(go_r);
        libc::close(err_w);
    }
    let mut slirp: Option<libc::pid_t> = None;
    let setup = (|| -> R<()> {
        trace("cloned");
        write_id_maps(pid, &spec)?;
        trace("id maps written");
        if let Some(slirp4netns) = &spec.network {
            slirp = Some(start_slirp(slirp4netns, pid)?);
        }
        Ok(())
    })();
    if let Err(e) = setup {
        // SAFETY: kill our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait(pid);
        return Err(e);
    }
    // Let the child go, then learn whether it reached exec.
    // SAFETY: one byte to a pipe we own.
    unsafe {
        libc::write(go_w, b"g".as_ptr().cast(), 1);
        libc::close(go_w);
    }
    let mut msg = String::new();
    // SAFETY: err_r is ours; File closes it.
    let _ = unsafe { fs::File::from_raw_fd(err_r) }.read_to_string(&mut msg);
    if !msg.is_empty() {
        wait(pid);
        return Err(msg);
    }
    trace("child exec'd");
    report(&format!("ok {pid}"));
    // Our stdin/stdout belong to the agent: drop our copies so that the server sees EOF as
    // soon as the agent's side closes.
    // SAFETY: opening /dev/null and dup2 on standard descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
    let status = wait(pid);
    if let Some(s) = slirp {
        // SAFETY: kill the slirp4netns we started.
        unsafe { libc::kill(s, libc::SIGKILL) };
        wait(s);
    }
    Ok(status)
}

/// Wait for a child; its exit code, or 128 + signal.
fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            return SETUP_FAILED;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        SETUP_FAILED
    }
}

fn write_id_maps(pid: libc::pid_t, spec: &LaunchSpec) -> R<()> {
    let map = format!("0 {} {}\n", spec.host_id_base, spec.id_count);
    for f in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{f}");
        fs::write(&path, &map).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

fn start_slirp(slirp4netns: &Path, pid: libc::pid_t) -> R<libc::pid_t> {
    let (ready_r, ready_w) = pipe()?;
    let args = [
        cstr(slirp4netns.as_os_str().as_bytes()),
        cstr("--configure"),
        cstr("--mtu=65520"),
        cstr("--disable-host-loopback"),
        cstr(format!("--ready-fd={ready_w}")),
        cstr(pid.to_string()),
        cstr("tap0"),
    ];
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: single-threaded fork; the child only adjusts fds and execs.
    let s = unsafe { libc::fork() };
    if s < 0 {
        return Err(format!("fork for slirp4netns: {}", errno()));
    }
    if s == 0 {
        // SAFETY: in the forked child: keep ready_w open across exec, detach stdio, exec.
        unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            libc::fcntl(ready_w, libc::F_SETFD, 0);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::execv(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
    }
    // SAFETY: close our copy of the write end, then read the ready byte.
    unsafe { libc::close(ready_w) };
    let mut buf = [0u8; 1];
    // SAFETY: ready_r is ours.
    let n = unsafe { fs::File::from_raw_fd(ready_r) }
        .read(&mut buf)
        .unwrap_or(0);
    if n != 1 {
        // SAFETY: kill the slirp we started.
        unsafe { libc::kill(s, libc::SIGKILL) };
        wait(s);
        return Err(format!(
            "slirp4netns ({}) did not become ready",
            slirp4netns.display()
        ));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// The child: PID 1 of the new pid namespace, root of the new user namespace.

fn child(spec: &LaunchSpec, go_r: RawFd) -> R<std::convert::Infallible> {
    // SAFETY: prctl and a blocking read of one byte from our pipe.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut b = 0u8;
        if libc::read(go_r, (&mut b as *mut u8).cast(), 1) != 1 {
            return Err("the launcher went away before setup".into());
        }
        libc::close(go_r);
    }
    // Become root of the new user namespace (host uid = host_id_base).
    // SAFETY: credential syscalls.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), || "setgroups".into())?;
        check(libc::setresgid(0, 0, 0), || "setresgid(0)".into())?;
        check(libc::setresuid(0, 0, 0), || "setresuid(0)".into())?;
    }
    trace("child: go");
    build_root(spec)?;
    trace("child: root built");
    sethostname(&spec.hostname)?;
    loopback_up()?;
    drop_privileges(spec.inner_id)?;
    trace("child: privileges dropped");
    if spec.seccomp {
        super::seccomp::install()?;
        trace("child: seccomp installed");
    }
    let home = if Path::new("/home/user").is_dir() {
        "/home/user"
    } else {
        "/"
    };
    let _ = std::env::set_current_dir(home);
    let argv: Vec<CString> = match &spec.command {
        Some(cmd) if !cmd.is_empty() => cmd.iter().map(cstr).collect(),
        _ => vec![cstr(AGENT_PATH)],
    };
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // execvpe for commands (PATH lookup from the given env), execve for the agent.
    // SAFETY: null-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execvpe(argv_p[0], argv_p.as_ptr(), envp_p.as_ptr()) };
    Err(format!("exec {:?}: {}", argv[0], errno()))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> R<()> {
    let src_c = src.map(|s| cstr(s.as_os_str().as_bytes()));
    let target_c = cstr(target.as_os_str().as_bytes());
    let fstype_c = fstype.map(cstr);
    let data_c = data.map(cstr);
    // SAFETY: valid C strings or nulls.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(r, || {
        format!(
            "mount {:?} on {} ({:?})",
            src.map(|s| s.display().to_string()),
            target.display(),
            fstype
        )
    })
}

/// Flags of the mount holding `path` that a read-only remount of a bind must keep (they
/// are locked in a user namespace: dropping them fails with EPERM).
fn locked_flags(path: &Path) -> libc::c_ulong {
    let c = cstr(path.as_os_str().as_bytes());
    // SAFETY: statvfs with a valid path and out pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let f = st.f_flag;
    let mut out = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms_flag;
        }
    }
    out
}

/// Bind `src` onto `dst` (created as a file or directory like `src`), read-only if asked.
fn bind(src: &Path, dst: &Path, read_only: bool, extra: libc::c_ulong) -> R<()> {
    let meta = fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(|e| format!("mkdir {}: {e}", dst.display()))?;
    } else {
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        }
        if !dst.exists() {
            fs::write(dst, b"").map_err(|e| format!("create {}: {e}", dst.display()))?;
        }
    }
    mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None)?;
    if read_only || extra != 0 {
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | locked_flags(dst) | extra;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        mount(None, dst, None, flags, None)?;
    }
    Ok(())
}

const HOST_SYSTEM: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// What of the host's /etc programs need (when it exists).
const HOST_ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "timezone",
    "mime.types",
    "nsswitch.conf",
    "protocols",
    "services",
    "matplotlibrc",
    "fonts",
    "R",
];
/// Files of /etc generated per session (in /.sparkla/etc; /etc has symlinks to them).
pub const GENERATED_ETC: &[&str] = &["passwd", "group", "hosts", "hostname", "resolv.conf"];

/// Build the /etc that sessions with the host's system directories see: copies of what
/// programs need from the host's /etc ([`HOST_ETC`]) and symlinks to the per-session
/// generated files. Made once per runtime start (so a session binds one directory instead
/// of a dozen files); replaced atomically.
///
/// Copying takes up to a second on a busy host, so a skeleton made from the same host files
/// (same paths, sizes, modification times and link targets) is reused.
pub fn prepare_etc_skeleton(dir: &Path) -> std::io::Result<()> {
    let stamp_file = dir.with_extension("stamp");
    let stamp = etc_stamp();
    if dir.is_dir() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    for name in HOST_ETC {
        let src = Path::new("/etc").join(name);
        if fs::symlink_metadata(&src).is_ok() {
            copy_tree(&src, &tmp.join(name))?;
        }
    }
    for name in GENERATED_ETC {
        symlink(format!("/.sparkla/etc/{name}"), tmp.join(name))?;
    }
    let _ = fs::remove_dir_all(dir);
    fs::rename(&tmp, dir)?;
    fs::write(&stamp_file, stamp)
}

/// A fingerprint of the host files the /etc skeleton copies.
fn etc_stamp() -> String {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    fn walk(path: &Path, h: &mut std::collections::hash_map::DefaultHasher) {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return;
        };
        (
            path,
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.mode(),
        )
            .hash(h);
        if meta.file_type().is_symlink() {
            fs::read_link(path).ok().hash(h);
        } else if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            names.sort();
            for p in names {
                walk(&p, h);
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for name in HOST_ETC {
        walk(&Path::new("/etc").join(name), &mut h);
    }
    GENERATED_ETC.hash(&mut h);
    format!("{:016x}\n", h.finish())
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        symlink(fs::read_link(src)?, dst)
    } else if meta.is_dir() {
        fs::create_dir(dst)?;
        fs::set_permissions(dst, meta.permissions())?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        fs::copy(src, dst).map(|_| ())
    } else {
        Ok(())
    }
}

/// Top-level entries of an environment directory that are not bound (the sandbox makes
/// its own).
const ENV_SKIP: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "tmp",
    "home",
    "run",
    "root",
    "mnt",
    "media",
    "lost+found",
    ".sparkla",
];

fn build_root(spec: &LaunchSpec) -> R<()> {
    let root = spec.root_mountpoint.as_path();
    // Nothing we do may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=16m,mode=0755"),
    )?;
    let mk = |p: &str, mode: u32| -> R<PathBuf> {
        let d = root.join(p);
        fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", d.display()))?;
        Ok(d)
    };

    // System directories.
    let sys_root = spec.rootfs.as_deref().unwrap_or(Path::new("/"));
    let entries: Vec<String> = match &spec.rootfs {
        None => HOST_SYSTEM.iter().map(|s| s.to_string()).collect(),
        Some(dir) => fs::read_dir(dir)
            .map_err(|e| format!("environment {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !ENV_SKIP.contains(&n.as_str()))
            .collect(),
    };
    for name in &entries {
        let src = sys_root.join(name);
        let Ok(meta) = fs::symlink_metadata(&src) else {
            continue;
        };
        let dst = root.join(name);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&src).map_err(|e| format!("{}: {e}", src.display()))?;
            symlink(&target, &dst).map_err(|e| format!("symlink {}: {e}", dst.display()))?;
        } else if meta.is_dir() || meta.is_file() {
            bind(&src, &dst, true, libc::MS_NOSUID | libc::MS_NODEV)?;
        }
    }

    // /etc: with the host's system, a minimal one; an environment brings its own.
    let etc = root.join("etc");
    let gen = mk(".sparkla/etc", 0o755)?;
    let inner = spec.inner_id;
    let files = [
        (
            "passwd",
            format!("root:x:0:0:root:/root:/bin/sh\nuser:x:{inner}:{inner}:Sparkla session:/home/user:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        ),
        (
            "group",
            format!("root:x:0:\nuser:x:{inner}:\nnogroup:x:65534:\n"),
        ),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                h = spec.hostname
            ),
        ),
        ("hostname", format!("{}\n", spec.hostname)),
        (
            "resolv.conf",
            if spec.network.is_some() {
                "nameserver 10.0.2.3\n".to_string()
            } else {
                String::new()
            },
        ),
    ];
    for (name, content) in &files {
        fs::write(gen.join(name), content).map_err(|e| format!("writing {name}: {e}"))?;
    }
    if let (None, Some(skel)) = (&spec.rootfs, &spec.etc_skeleton) {
        bind(skel, &etc, true, libc::MS_NOSUID | libc::MS_NODEV)?;
    } else if spec.rootfs.is_none() {
        fs::create_dir_all(&etc).map_err(|e| format!("mkdir /etc: {e}"))?;
        for name in HOST_ETC {
            let src = Path::new("/etc").join(name);
            let Ok(meta) = fs::symlink_metadata(&src) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&src).map_err(|e| format!("{}: {e}", src.display()))?;
                symlink(&target, etc.join(name))
                    .map_err(|e| format!("symlink /etc/{name}: {e}"))?;
            } else {
                bind(
                    &src,
                    &etc.join(name),
                    true,
                    libc::MS_NOSUID | libc::MS_NODEV,
                )?;
            }
        }
        for (name, _) in &files {
            symlink(format!("/.sparkla/etc/{name}"), etc.join(name))
                .map_err(|e| format!("symlink /etc/{name}: {e}"))?;
        }
    } else {
        // Overlay the generated files where the environment has them.
        for (name, _) in &files {
            let dst = etc.join(name);
            if fs::symlink_metadata(&dst)
                .map(|m| m.is_file())
                .unwrap_or(false)
            {
                bind(
                    &gen.join(name),
                    &dst,
                    true,
                    libc::MS_NOSUID | libc::MS_NODEV,
                )?;
            }
        }
    }

    // /dev: a tmpfs with only the harmless devices bound in.
    let dev = mk("dev", 0o755)?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )?;
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = Path::new("/dev").join(d);
        if src.exists() {
            bind(&src, &dev.join(d), false, 0)?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(target, dev.join(name)).map_err(|e| format!("symlink /dev/{name}: {e}"))?;
    }
    fs::create_dir(dev.join("shm")).map_err(|e| format!("mkdir /dev/shm: {e}"))?;
    fs::create_dir(dev.join("pts")).map_err(|e| format!("mkdir /dev/pts: {e}"))?;
    // A private devpts instance (pseudo-terminals for code that wants them); optional.
    let _ = mount(
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );

    // /proc: fresh, of the new pid namespace.
    let proc_ = mk("proc", 0o555)?;
    mount(
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    // Scratch: one bounded tmpfs for /tmp, home and /dev/shm (its pages count against the
    // session's memory cgroup).
    let scratch = mk(".sparkla/scratch", 0o755)?;
    mount(
        Some(Path::new("tmpfs")),
        &scratch,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("size={},mode=0755", spec.scratch_bytes.max(4096))),
    )?;
    for (sub, dst, mode) in [
        ("tmp", "tmp", 0o1777),
        ("home", "home/user", 0o755),
        ("shm", "dev/shm", 0o1777),
    ] {
        let s = scratch.join(sub);
        fs::create_dir(&s).map_err(|e| format!("mkdir scratch/{sub}: {e}"))?;
        fs::set_permissions(&s, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod scratch/{sub}: {e}"))?;
        // SAFETY: chown a directory we made.
        let c = cstr(s.as_os_str().as_bytes());
        check(unsafe { libc::chown(c.as_ptr(), inner, inner) }, || {
            format!("chown scratch/{sub}")
        })?;
        let d = root.join(dst);
        fs::create_dir_all(&d).map_err(|e| format!("mkdir {dst}: {e}"))?;
        mount(Some(&s), &d, None, libc::MS_BIND, None)?;
    }
    // The scratch mount itself is not needed once bound.
    let c = cstr(scratch.as_os_str().as_bytes());
    // SAFETY: detach a mount we made.
    check(
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) },
        || "umount scratch".into(),
    )?;
    if spec.rootfs.is_none() {
        // Common expectations of programs.
        let var = mk("var", 0o755)?;
        symlink("/tmp", var.join("tmp")).map_err(|e| format!("symlink /var/tmp: {e}"))?;
    }

    // The agent, read-only.
    bind(
        &spec.agent,
        &root.join(".sparkla/agent"),
        true,
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;

    // Volume mounts (validated by the runtime).
    for m in &spec.mounts {
        let rel = m.destination.strip_prefix("/").unwrap_or(&m.destination);
        bind(
            &m.source,
            &root.join(rel),
            m.read_only,
            libc::MS_NOSUID | libc::MS_NODEV,
        )?;
    }

    // The root tmpfs itself becomes read-only.
    mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;

    // pivot_root(".", "."): the old root ends up on top and is detached.
    let rc = cstr(root.as_os_str().as_bytes());
    // SAFETY: chdir/pivot_root/umount2 with valid C strings.
    unsafe {
        check(libc::chdir(rc.as_ptr()), || "chdir new root".into())?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            || "pivot_root".into(),
        )?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into())?;
    }
    Ok(())
}

fn sethostname(name: &str) -> R<()> {
    // SAFETY: pointer and length of a live string.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        || "sethostname".into(),
    )
}

fn loopback_up() -> R<()> {
    // SAFETY: a socket for the ioctl, a zeroed ifreq with the name set.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(fd, || "socket".into())?;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        libc::close(fd);
        check(r, || "bringing up lo".into())
    }
}

fn drop_privileges(id: u32) -> R<()> {
    // SAFETY: prctl/credential syscalls with plain integer arguments.
    unsafe {
        // Empty the bounding set (needs CAP_SETPCAP, which we still have).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                && errno().raw_os_error() == Some(libc::EINVAL)
            {
                break;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        check(libc::setgroups(0, std::ptr::null()), || "setgroups".into())?;
        check(libc::setresgid(id, id, id), || format!("setresgid({id})"))?;
        // Changing all uids from 0 to non-zero clears the permitted and effective sets.
        check(libc::setresuid(id, id, id), || format!("setresuid({id})"))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), || {
            "no_new_privs".into()
        })?;
        // Belt and braces: an empty capability state.
        let mut hdr = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int,
            || "capset".into(),
        )?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
