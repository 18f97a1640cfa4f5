//! Control groups for sessions, on cgroup v2 (unified) and v1 (one hierarchy per controller).
//!
//! Every session gets one cgroup (one per controller hierarchy on v1) under a Sparkla
//! parent group. The parent is nested under the server's own cgroup when that is possible
//! (delegation, e.g. under systemd on v2) and falls back to the hierarchy root otherwise.
//!
//! | limit | v2 | v1 |
//! |---|---|---|
//! | memory, no swap | `memory.max`, `memory.swap.max = 0` | `memory.limit_in_bytes`, `memory.memsw.limit_in_bytes` (if present) |
//! | cpu | `cpu.max` (`quota period`) | `cpu.cfs_quota_us`, `cpu.cfs_period_us` |
//! | pids | `pids.max` | `pids.max` |
//! | OOM kills | `memory.events` `oom_kill` | `memory.oom_control` `oom_kill` |
//! | kill all | `cgroup.kill` | SIGKILL every pid of `cgroup.procs` until empty |

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::RuntimeError;

/// The CFS period used for CPU quotas (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Limits as written to a cgroup (the runtime has already applied its defaults).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    pub cpu_cores: Option<f64>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The v1 controllers Sparkla uses. `cpuacct` is optional (CPU usage accounting).
const V1_REQUIRED: [&str; 3] = ["memory", "pids", "cpu"];
/// Whether `nest_under_self` applies on v1 too (it does not: see [`Cgroups::detect`]).
const V1_NEST: bool = false;

/// The parent groups of all sessions, on one host.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: CgroupVersion,
    /// v2: one directory. v1: one directory per controller (`memory`, `pids`, `cpu`, and
    /// `cpuacct` if it is mounted separately from `cpu`).
    parents: Vec<(String, PathBuf)>,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let context = context.into();
    move |e| RuntimeError::io(context, e)
}

fn unavailable(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Unavailable {
        runtime: "sandbox",
        reason: reason.into(),
    }
}

/// A cgroup mount found in /proc/self/mountinfo: its mount point, the path of the
/// hierarchy mounted there (usually `/`), and its super options.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    mount_point: PathBuf,
    root: String,
    fstype: String,
    super_options: String,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        if r[0] == "cgroup" || r[0] == "cgroup2" {
            mounts.push(CgroupMount {
                mount_point: PathBuf::from(unescape_mountinfo(l[4])),
                root: unescape_mountinfo(l[3]),
                fstype: r[0].to_string(),
                super_options: r[2].to_string(),
            });
        }
    }
    mounts
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Parse /proc/self/cgroup: `(v2 path, [(v1 controllers, path)])`.
fn parse_proc_cgroup(text: &str) -> (Option<String>, Vec<(Vec<String>, String)>) {
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            v1.push((
                ctrls.split(',').map(str::to_string).collect(),
                path.to_string(),
            ));
        }
    }
    (v2, v1)
}

fn join_cgroup_path(mount: &CgroupMount, own: &str) -> PathBuf {
    // The mount may expose a sub-tree of the hierarchy (root != "/", e.g. in a container):
    // strip it from our path.
    let rel = own
        .strip_prefix(mount.root.trim_end_matches('/'))
        .unwrap_or(own)
        .trim_start_matches('/');
    if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    }
}

impl Cgroups {
    /// Find the cgroup hierarchies of this host and create (or reuse) the parent group
    /// `name`. v2 is used when its memory, pids and cpu controllers are available; otherwise
    /// v1 with memory, pids and cpu hierarchies mounted.
    ///
    /// With `nest_under_self`, on v2 the parent is created under the server's own cgroup
    /// when that works (the own cgroup must be delegable: no processes of its own, or the
    /// root); otherwise at the hierarchy root. On v1 the parent is always at the root of
    /// each hierarchy.
    pub fn detect(name: &str, nest_under_self: bool) -> Result<Self, RuntimeError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(RuntimeError::Refused(format!(
                "invalid cgroup parent name {name:?}"
            )));
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("reading /proc/self/mountinfo"))?;
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = parse_mountinfo(&mountinfo);
        let (own_v2, own_v1) = parse_proc_cgroup(&own);

        // v2, if it has the controllers.
        if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
            let controllers =
                fs::read_to_string(m.mount_point.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") && has("cpu") {
                let mut candidates = Vec::new();
                if nest_under_self {
                    if let Some(own) = own_v2.as_deref().filter(|p| *p != "/") {
                        candidates.push(join_cgroup_path(m, own));
                    }
                }
                candidates.push(m.mount_point.clone());
                let mut last_err = None;
                for base in candidates {
                    match Self::v2_at(&m.mount_point, &base, name) {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            tracing::debug!(base = %base.display(), error = %e, "cgroup v2 parent not usable");
                            last_err = Some(e);
                        }
                    }
                }
                if let Some(e) = last_err {
                    return Err(e);
                }
            }
        }

        // v1.
        let mut parents = Vec::new();
        for ctrl in ["memory", "pids", "cpu", "cpuacct"] {
            let Some(m) = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == ctrl))
            else {
                if V1_REQUIRED.contains(&ctrl) {
                    return Err(unavailable(format!(
                        "no usable cgroup hierarchy: cgroup v2 lacks memory/pids/cpu controllers and cgroup v1 has no {ctrl} hierarchy mounted"
                    )));
                }
                continue;
            };
            if ctrl == "cpuacct" {
                // Skip when it shares the cpu hierarchy (cpu,cpuacct): already covered.
                if parents
                    .iter()
                    .any(|(_, p): &(String, PathBuf)| p.starts_with(&m.mount_point))
                {
                    continue;
                }
            }
            // v1 has no delegation model (creating groups needs root anyway), so the parent
            // sits at the hierarchy root, outside whatever cgroup the server was started in.
            let mut base = m.mount_point.clone();
            if nest_under_self && V1_NEST {
                if let Some((_, own)) = own_v1.iter().find(|(c, _)| c.iter().any(|x| x == ctrl)) {
                    base = join_cgroup_path(m, own);
                }
            }
            let dir = base.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(unavailable(format!(
                    "cannot create cgroup {}: {e} (the sandbox needs root, or a delegated cgroup)",
                    dir.display()
                )))
                }
            }
            parents.push((ctrl.to_string(), dir));
        }
        Ok(Self {
            version: CgroupVersion::V1,
            parents,
        })
    }

    /// A v2 parent `base/name` on the hierarchy mounted at `mount`: enables the memory,
    /// pids and cpu controllers from the mount point down to the parent. Public so that the
    /// v2 logic can be tested against a directory that imitates cgroupfs.
    pub fn v2_at(mount: &Path, base: &Path, name: &str) -> Result<Self, RuntimeError> {
        let dir = base.join(name);
        // Enable controllers on every level from the mount to `base` (inclusive), so that
        // `base/name` and its children get them.
        let rel = base.strip_prefix(mount).unwrap_or(Path::new(""));
        let mut level = mount.to_path_buf();
        let mut levels = vec![level.clone()];
        for c in rel.components() {
            level = level.join(c);
            levels.push(level.clone());
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(unavailable(format!(
                    "cannot create cgroup {}: {e}",
                    dir.display()
                )))
            }
        }
        levels.push(dir.clone());
        for l in &levels {
            enable_v2_controllers(l).map_err(|e| {
                unavailable(format!(
                    "cannot enable memory/pids/cpu controllers in {}: {e}",
                    l.display()
                ))
            })?;
        }
        Ok(Self {
            version: CgroupVersion::V2,
            parents: vec![("unified".into(), dir)],
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The parent directories (one on v2; one per controller on v1).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.parents.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Create the cgroup of one session and write its limits.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Cgroup, RuntimeError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(RuntimeError::Refused(format!(
                "invalid cgroup name {name:?}"
            )));
        }
        let mut dirs = Vec::new();
        for (ctrl, parent) in &self.parents {
            let dir = parent.join(name);
            if let Err(e) = fs::create_dir(&dir) {
                let cg = Cgroup {
                    version: self.version,
                    dirs,
                };
                let _ = cg.remove(Duration::from_millis(100));
                return Err(RuntimeError::io(
                    format!("creating cgroup {}", dir.display()),
                    e,
                ));
            }
            dirs.push((ctrl.clone(), dir));
        }
        let cg = Cgroup {
            version: self.version,
            dirs,
        };
        if let Err(e) = cg.set_limits(limits) {
            let _ = cg.remove(Duration::from_millis(500));
            return Err(e);
        }
        Ok(cg)
    }

    /// Open the existing cgroup `name` (e.g. a leftover).
    pub fn open(&self, name: &str) -> Cgroup {
        Cgroup {
            version: self.version,
            dirs: self
                .parents
                .iter()
                .map(|(c, p)| (c.clone(), p.join(name)))
                .collect(),
        }
    }

    /// Names of the session cgroups that exist under the parent.
    pub fn children(&self) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for (_, parent) in &self.parents {
            if let Ok(rd) = fs::read_dir(parent) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        names.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// Kill and remove every session cgroup under the parent. Returns how many were removed.
    pub fn sweep(&self) -> Result<usize, RuntimeError> {
        let mut n = 0;
        for name in self.children() {
            self.open(&name).remove(Duration::from_secs(5))?;
            n += 1;
        }
        Ok(n)
    }

    /// Remove the (empty) parent group itself (tests, uninstall).
    pub fn remove_parent(&self) -> Result<(), RuntimeError> {
        self.sweep()?;
        for (_, p) in &self.parents {
            match fs::remove_dir(p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(RuntimeError::io(format!("removing {}", p.display()), e)),
            }
        }
        Ok(())
    }
}

fn enable_v2_controllers(dir: &Path) -> io::Result<()> {
    let current = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = ["memory", "pids", "cpu"]
        .iter()
        .filter(|c| !current.split_whitespace().any(|x| x == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.subtree_control"), missing.join(" "))
}

/// The cgroup of one session.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<(String, PathBuf)>,
}

fn write_file(path: &Path, value: &str) -> Result<(), RuntimeError> {
    fs::write(path, value)
        .map_err(|e| RuntimeError::io(format!("writing {value:?} to {}", path.display()), e))
}

impl Cgroup {
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn dir(&self, ctrl: &str) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dirs.first().map(|(_, d)| d.as_path()),
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == ctrl)
                .map(|(_, d)| d.as_path()),
        }
    }

    /// The directories of this cgroup (one on v2, one per controller on v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    /// The `cgroup.procs` files a process must write its pid to, to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Move a process into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), RuntimeError> {
        for f in self.procs_files() {
            write_file(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Write limits. `None` means unlimited (`max`).
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), RuntimeError> {
        match self.version {
            CgroupVersion::V2 => {
                let d = self.dir("unified").expect("v2 dir");
                write_file(
                    &d.join("memory.max"),
                    &limits
                        .memory_bytes
                        .map_or("max".to_string(), |b| b.to_string()),
                )?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                write_file(&d.join("cpu.max"), &v2_cpu_max(limits.cpu_cores))?;
                write_file(
                    &d.join("pids.max"),
                    &limits.pids.map_or("max".to_string(), |p| p.to_string()),
                )?;
            }
            CgroupVersion::V1 => {
                if let Some(d) = self.dir("memory") {
                    let limit = limits
                        .memory_bytes
                        .map_or("-1".to_string(), |b| b.to_string());
                    let memsw = d.join("memory.memsw.limit_in_bytes");
                    // memsw must stay >= limit: order the writes so each is valid.
                    let raising = limits.memory_bytes.is_none_or(|new| {
                        fs::read_to_string(d.join("memory.limit_in_bytes"))
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .is_some_and(|old| new > old)
                    });
                    if memsw.exists() && raising {
                        write_file(&memsw, &limit)?;
                    }
                    write_file(&d.join("memory.limit_in_bytes"), &limit)?;
                    if memsw.exists() && !raising {
                        write_file(&memsw, &limit)?;
                    }
                    // No swapping of session memory even where memsw accounting is off.
                    let _ = fs::write(d.join("memory.swappiness"), "0");
                }
                if let Some(d) = self.dir("cpu") {
                    write_file(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let quota = limits
                        .cpu_cores
                        .map_or("-1".to_string(), |c| cpu_quota_us(c).to_string());
                    write_file(&d.join("cpu.cfs_quota_us"), &quota)?;
                }
                if let Some(d) = self.dir("pids") {
                    write_file(
                        &d.join("pids.max"),
                        &limits.pids.map_or("max".to_string(), |p| p.to_string()),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// How many times the OOM killer killed a process in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
        };
        let Some(d) = self.dir("memory") else {
            return 0;
        };
        fs::read_to_string(d.join(file))
            .map(|s| read_key(&s, key).unwrap_or(0))
            .unwrap_or(0)
    }

    /// CPU time used by the cgroup, in microseconds (None if not accounted).
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V2 => fs::read_to_string(self.dir("unified")?.join("cpu.stat"))
                .ok()
                .and_then(|s| read_key(&s, "usage_usec")),
            CgroupVersion::V1 => {
                for ctrl in ["cpuacct", "cpu"] {
                    if let Some(d) = self.dir(ctrl) {
                        if let Ok(s) = fs::read_to_string(d.join("cpuacct.usage")) {
                            return s.trim().parse::<u64>().ok().map(|ns| ns / 1000);
                        }
                    }
                }
                None
            }
        }
    }

    /// Current memory use in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        fs::read_to_string(self.dir("memory")?.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The pids in this cgroup (from the pids controller's directory on v1).
    pub fn pids(&self) -> Vec<i32> {
        let d = match self.version {
            CgroupVersion::V2 => self.dir("unified"),
            CgroupVersion::V1 => self.dir("pids").or_else(|| self.dir("memory")),
        };
        let mut out = Vec::new();
        if let Some(d) = d {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out
    }

    /// Kill every process of the cgroup (and its descendants). Returns once no process is
    /// left or `timeout` passed.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + timeout;
        if self.version == CgroupVersion::V2 {
            if let Some(d) = self.dir("unified") {
                let kill = d.join("cgroup.kill");
                if kill.exists() && fs::write(&kill, "1").is_ok() {
                    while !self.pids().is_empty() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    return self.check_empty();
                }
            }
        }
        // v1 (and v2 kernels before 5.14): kill what is listed until nothing is. Forks that
        // race with us land in the list and are killed on the next round; the pids limit
        // bounds how many there can be.
        let mut pause = Duration::from_micros(50);
        loop {
            let pids = self.all_pids();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from the cgroup; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() >= deadline {
                return self.check_empty();
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(Duration::from_millis(2));
        }
    }

    fn all_pids(&self) -> Vec<i32> {
        let mut all = std::collections::BTreeSet::new();
        for (_, d) in &self.dirs {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                all.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        all.into_iter().collect()
    }

    fn check_empty(&self) -> Result<(), RuntimeError> {
        let left = self.all_pids();
        if left.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::io(
                format!("killing the processes of cgroup {:?}", self.dirs),
                io::Error::other(format!("{} processes still alive", left.len())),
            ))
        }
    }

    /// Kill everything and remove the cgroup directories (retrying while they are busy).
    pub fn remove(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + timeout;
        self.kill_all(timeout)?;
        for (_, d) in self.dirs.iter().rev() {
            // Child groups (e.g. made inside by a cgroup namespace) go first.
            remove_tree(d, deadline)?;
        }
        Ok(())
    }
}

fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), RuntimeError> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path(), deadline)?;
            }
        }
    }
    let mut pause = Duration::from_micros(100);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY while the last killed processes are still exiting.
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(pause);
                pause = (pause * 3 / 2).min(Duration::from_millis(2));
            }
            // An imitation cgroupfs (tests) holds regular files: clear them.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    && fs::read_dir(dir)
                        .map(|rd| {
                            rd.flatten()
                                .all(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                        })
                        .unwrap_or(false)
                    && !dir.starts_with("/sys/fs/cgroup") =>
            {
                fs::remove_dir_all(dir)
                    .map_err(|e| RuntimeError::io(format!("removing {}", dir.display()), e))?;
                return Ok(());
            }
            Err(e) => return Err(RuntimeError::io(format!("removing {}", dir.display()), e)),
        }
    }
}

fn read_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

/// The CFS quota for `cores` per [`CPU_PERIOD_US`] (at least 1 ms, the kernel's minimum).
pub fn cpu_quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// The value of v2 `cpu.max` for a quota in cores.
pub fn v2_cpu_max(cores: Option<f64>) -> String {
    match cores {
        Some(c) => format!("{} {}", cpu_quota_us(c), CPU_PERIOD_US),
        None => format!("max {CPU_PERIOD_US}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_and_proc_cgroup() {
        let mi =
            "30 24 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                  31 24 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  32 24 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  22 1 8:1 / / rw - ext4 /dev/vda rw\n";
        let m = parse_mountinfo(mi);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[1].fstype, "cgroup2");
        assert!(m[2].super_options.split(',').any(|o| o == "cpuacct"));

        let (v2, v1) = parse_proc_cgroup("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/user.slice/x\n");
        assert_eq!(v2.as_deref(), Some("/user.slice/x"));
        assert_eq!(v1[0], (vec!["memory".to_string()], "/a/b".to_string()));
        assert_eq!(v1[1].0, vec!["cpu".to_string(), "cpuacct".to_string()]);
    }

    #[test]
    fn joins_paths_of_sub_tree_mounts() {
        let m = CgroupMount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/docker/abc".into(),
            fstype: "cgroup2".into(),
            super_options: "rw".into(),
        };
        assert_eq!(
            join_cgroup_path(&m, "/docker/abc/svc"),
            PathBuf::from("/sys/fs/cgroup/svc")
        );
        assert_eq!(
            join_cgroup_path(&m, "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn cpu_quota_values() {
        assert_eq!(cpu_quota_us(0.25), 25_000);
        assert_eq!(cpu_quota_us(2.0), 200_000);
        assert_eq!(cpu_quota_us(0.0001), 1000);
        assert_eq!(v2_cpu_max(Some(0.5)), "50000 100000");
        assert_eq!(v2_cpu_max(None), "max 100000");
    }

    /// The v2 path: controllers enabled from the mount down, limits in v2 format, OOM kills
    /// from memory.events, removal. Against a directory imitating cgroupfs.
    #[test]
    fn v2_logic_against_a_fake_cgroupfs() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path();
        fs::write(mount.join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir(mount.join("server.slice")).unwrap();
        fs::write(mount.join("server.slice/cgroup.subtree_control"), "cpu").unwrap();
        let groups = Cgroups::v2_at(mount, &mount.join("server.slice"), "sparkla").unwrap();
        assert_eq!(groups.version(), CgroupVersion::V2);
        // The fake filesystem keeps what was written, so each level holds what we wrote.
        assert_eq!(
            fs::read_to_string(mount.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        assert_eq!(
            fs::read_to_string(mount.join("server.slice/cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        let parent = mount.join("server.slice/sparkla");
        assert!(parent.is_dir());

        // A kernel would create these files in a new cgroup.
        let sess = parent.join("s1");
        fs::create_dir(&sess).unwrap();
        fs::write(sess.join("memory.swap.max"), "max").unwrap();
        fs::remove_dir(&sess).unwrap_or(());
        let cg = groups.open("s1");
        fs::create_dir_all(&sess).unwrap();
        fs::write(sess.join("memory.swap.max"), "max").unwrap();
        cg.set_limits(&CgroupLimits {
            memory_bytes: Some(256 << 20),
            cpu_cores: Some(0.25),
            pids: Some(64),
        })
        .unwrap();
        assert_eq!(
            fs::read_to_string(sess.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(
            fs::read_to_string(sess.join("memory.swap.max")).unwrap(),
            "0"
        );
        assert_eq!(
            fs::read_to_string(sess.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        assert_eq!(fs::read_to_string(sess.join("pids.max")).unwrap(), "64");
        cg.set_limits(&CgroupLimits::default()).unwrap();
        assert_eq!(fs::read_to_string(sess.join("memory.max")).unwrap(), "max");
        assert_eq!(
            fs::read_to_string(sess.join("cpu.max")).unwrap(),
            "max 100000"
        );

        fs::write(
            sess.join("memory.events"),
            "low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 2);
        fs::write(sess.join("cpu.stat"), "usage_usec 1234\nuser_usec 1000\n").unwrap();
        assert_eq!(cg.cpu_usage_usec(), Some(1234));
        assert_eq!(cg.procs_files(), vec![sess.join("cgroup.procs")]);
        assert_eq!(groups.children(), vec!["s1".to_string()]);
        assert_eq!(groups.sweep().unwrap(), 1);
        assert!(!sess.exists());
    }

    #[test]
    fn v1_oom_control_format() {
        let s = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(read_key(s, "oom_kill"), Some(3));
        assert_eq!(read_key(s, "nope"), None);
    }
}
