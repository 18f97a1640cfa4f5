//! The seccomp filter of sandboxed sessions: a deny list, kept as data.
//!
//! The sandbox already runs code as an unprivileged uid with no capabilities, in its own
//! user namespace, with `no_new_privs`. The filter removes kernel attack surface that
//! ordinary programs (Python, R, Node, shells, compilers) never need, and that has been the
//! way out of namespaces-based sandboxes in the past. Everything not listed is allowed, so
//! languages keep working unchanged. A denied call fails with `EPERM` (programs see an
//! ordinary permission error instead of dying), except `clone3`, which fails with `ENOSYS`
//! so that libc falls back to `clone`, whose flags the filter can inspect.
//!
//! Syscalls of another ABI (i386 via `int 0x80`) kill the process: the filter is compiled
//! for x86_64 (or aarch64) only. x32 syscall numbers (bit 30 set) are killed as well.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// A denied syscall and why.
pub struct Denied {
    pub name: &'static str,
    pub nr: i64,
    pub why: &'static str,
}

macro_rules! deny {
    ($($name:ident: $why:expr),* $(,)?) => {
        &[$(Denied { name: stringify!($name), nr: libc::$name as i64, why: $why }),*]
    };
}

/// Syscalls that always fail with EPERM inside a session.
pub const DENY_LIST: &[Denied] = deny![
    // Filesystem topology: code must not rearrange its view of the filesystem.
    SYS_mount: "mounting could uncover what the sandbox hid, or mount new filesystems",
    SYS_umount2: "unmounting could uncover host paths under the sandbox's mounts",
    SYS_pivot_root: "changes the root filesystem",
    SYS_chroot: "changes the root; useless to sessions, classic escape ingredient",
    SYS_open_tree: "new mount API",
    SYS_move_mount: "new mount API",
    SYS_fsopen: "new mount API",
    SYS_fsconfig: "new mount API",
    SYS_fsmount: "new mount API",
    SYS_fspick: "new mount API",
    SYS_mount_setattr: "new mount API (could clear read-only flags)",
    // Namespaces: nested user namespaces give back capabilities over new namespaces and
    // expose much kernel code to unprivileged users (many CVEs).
    SYS_unshare: "creates new namespaces",
    SYS_setns: "joins other namespaces",
    // Debugging and introspection of other processes.
    SYS_ptrace: "inspects and controls other processes",
    SYS_process_vm_readv: "reads another process's memory",
    SYS_process_vm_writev: "writes another process's memory",
    SYS_kcmp: "compares kernel objects of other processes (an information leak)",
    SYS_pidfd_getfd: "steals file descriptors from other processes",
    // Kernel facilities with a history of privilege escalations.
    SYS_bpf: "eBPF programs and maps",
    SYS_perf_event_open: "performance counters: side channels and kernel bugs",
    SYS_userfaultfd: "used to widen race windows in kernel exploits",
    SYS_io_uring_setup: "io_uring: large attack surface, bypasses seccomp for its operations",
    SYS_io_uring_enter: "io_uring",
    SYS_io_uring_register: "io_uring",
    SYS_keyctl: "kernel keyrings are not namespaced",
    SYS_add_key: "kernel keyrings are not namespaced",
    SYS_request_key: "kernel keyrings are not namespaced",
    SYS_open_by_handle_at: "opens files by handle, bypassing the mount namespace (the 'shocker' escape)",
    SYS_name_to_handle_at: "companion of open_by_handle_at",
    SYS_fanotify_init: "watches filesystem events beyond the sandbox",
    // Host-wide state: a session must not change the machine.
    SYS_kexec_load: "loads a new kernel",
    SYS_kexec_file_load: "loads a new kernel",
    SYS_init_module: "loads kernel modules",
    SYS_finit_module: "loads kernel modules",
    SYS_delete_module: "unloads kernel modules",
    SYS_reboot: "reboots the host",
    SYS_swapon: "host swap",
    SYS_swapoff: "host swap",
    SYS_clock_settime: "the clock is not namespaced",
    SYS_clock_adjtime: "the clock is not namespaced",
    SYS_settimeofday: "the clock is not namespaced",
    SYS_adjtimex: "the clock is not namespaced",
    SYS_acct: "process accounting of the host",
    SYS_quotactl: "filesystem quotas of the host",
    SYS_syslog: "the kernel log (addresses, other tenants' messages)",
    SYS_iopl: "raw I/O port access",
    SYS_ioperm: "raw I/O port access",
    SYS_vhangup: "hangs up terminals",
    SYS_lookup_dcookie: "kernel profiling",
    SYS_personality: "can disable ASLR (only the default persona is allowed, below)",
];

/// `clone` flags that create namespaces; clone with any of them is denied.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

fn arch() -> seccompiler::TargetArch {
    std::env::consts::ARCH
        .try_into()
        .expect("seccomp: unsupported architecture")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("valid seccomp rule")
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("valid condition")
}

/// Build the BPF programs to install, in order: the EPERM deny list (with argument rules
/// for `clone`, `ioctl(TIOCSTI)` and `personality`), then the `clone3` → ENOSYS filter.
pub fn programs() -> Vec<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for d in DENY_LIST {
        if d.nr == libc::SYS_personality {
            continue;
        }
        rules.insert(d.nr, vec![]);
    }
    // clone(flags, ...) with any namespace flag.
    let mut clone_rules = Vec::new();
    let mut bit = 1u64;
    while bit != 0 {
        if CLONE_NAMESPACE_FLAGS & bit != 0 {
            clone_rules.push(rule(vec![cond(0, SeccompCmpOp::MaskedEq(bit), bit)]));
        }
        bit = bit.wrapping_shl(1);
        if bit > CLONE_NAMESPACE_FLAGS {
            break;
        }
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // ioctl(fd, TIOCSTI): pushes characters into a terminal's input queue.
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![cond(
            1,
            SeccompCmpOp::MaskedEq(0xffff_ffff),
            libc::TIOCSTI,
        )])],
    );
    // personality: allow only querying (0xffffffff) and the default persona (0).
    rules.insert(
        libc::SYS_personality,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Ne, 0),
            cond(0, SeccompCmpOp::Ne, 0xffff_ffff),
        ])],
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch(),
    )
    .expect("valid seccomp filter");
    let mut deny: BpfProgram = deny.try_into().expect("compilable seccomp filter");
    reject_x32(&mut deny);

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .expect("valid seccomp filter");
    vec![deny, clone3.try_into().expect("compilable seccomp filter")]
}

/// After the architecture check (the first 3 instructions), kill x32 syscalls: on x86_64
/// the same audit arch carries them with bit 30 set in the number.
fn reject_x32(prog: &mut BpfProgram) {
    if std::env::consts::ARCH != "x86_64" {
        return;
    }
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let extra = [
        ins(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        ins(BPF_JMP_JGE_K, 0, 1, 0x4000_0000),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    let at = 3.min(prog.len());
    prog.splice(at..at, extra);
}

/// Install the filters on the calling thread (after `no_new_privs`).
pub fn install() -> Result<(), String> {
    for p in programs() {
        seccompiler::apply_filter(&p).map_err(|e| format!("installing seccomp filter: {e}"))?;
    }
    Ok(())
}

/// The deny list as a Markdown table (for documentation).
pub fn markdown() -> String {
    let mut s = String::from("| syscall | why it is denied |\n|---|---|\n");
    for d in DENY_LIST {
        s.push_str(&format!(
            "| `{}` | {} |\n",
            d.name.trim_start_matches("SYS_"),
            d.why
        ));
    }
    s.push_str("| `clone` with namespace flags | creates new namespaces |\n");
    s.push_str(
        "| `clone3` (ENOSYS) | its flags cannot be inspected; libc falls back to `clone` |\n",
    );
    s.push_str("| `ioctl(TIOCSTI)` | injects input into a terminal |\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let p = programs();
        assert_eq!(p.len(), 2);
        assert!(p[0].len() > DENY_LIST.len());
        assert!(markdown().contains("`ptrace`"));
    }

    #[test]
    fn required_syscalls_are_denied() {
        let names: Vec<&str> = DENY_LIST.iter().map(|d| d.name).collect();
        for required in [
            "SYS_mount",
            "SYS_umount2",
            "SYS_unshare",
            "SYS_setns",
            "SYS_ptrace",
            "SYS_bpf",
            "SYS_perf_event_open",
            "SYS_kexec_load",
            "SYS_init_module",
            "SYS_finit_module",
            "SYS_keyctl",
            "SYS_add_key",
            "SYS_request_key",
            "SYS_reboot",
            "SYS_swapon",
            "SYS_clock_settime",
            "SYS_settimeofday",
            "SYS_open_by_handle_at",
            "SYS_userfaultfd",
        ] {
            assert!(names.contains(&required), "{required} must be denied");
        }
    }
}
