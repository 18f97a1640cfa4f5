//! The escape battery and the limit tests of the sandbox runtime: real sandboxes running
//! shell scripts (debug mode of the launcher) and real agents. Needs root; prints SKIPPED
//! otherwise.

mod common;

use common::{sandbox, sh_in, sh_keep, skip, spec};
use sparkla_runtime::{Instance, Limits};
use std::time::{Duration, Instant};

/// Read planted host files in /root, /tmp and /var/tmp, and /etc/shadow.
#[tokio::test]
async fn cannot_read_host_files() {
    if skip("cannot_read_host_files", false) {
        return;
    }
    let t = sandbox("esc-files", 1);
    let tag = format!("sparkla-planted-{}", std::process::id());
    let planted = [
        format!("/root/{tag}"),
        format!("/tmp/{tag}"),
        format!("/var/tmp/{tag}"),
    ];
    for p in &planted {
        std::fs::write(p, "host secret").unwrap();
    }
    let script = format!(
        r#"for f in /root/{tag} /tmp/{tag} /var/tmp/{tag} /etc/shadow /etc/sudoers /home/*/.bash_history; do
             if cat "$f" 2>/dev/null | grep -q .; then echo "READ $f"; fi
           done
           find / -xdev -name '{tag}' 2>/dev/null | sed 's/^/FOUND /'
           grep -rl 'host secret' /tmp /var /home 2>/dev/null | sed 's/^/GREP /'
           for d in /root /run /var/run /var/lib /sys /boot /mnt /media /srv /opt; do
             if ls -A "$d" 2>/dev/null | grep -q .; then echo "SEES $d"; fi
           done
           ls /dev | tr '\n' ' '; echo
           echo done"#
    );
    let (code, out) = sh_in(&t.rt, spec("esc-files"), &script).await;
    for p in &planted {
        let _ = std::fs::remove_file(p);
    }
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("done"), "{out}");
    for bad in ["READ", "FOUND", "GREP", "SEES"] {
        assert!(!out.contains(bad), "sandbox saw host files: {out}");
    }
    let devs: Vec<&str> = out
        .lines()
        .rev()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    for d in &devs {
        assert!(
            [
                "null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout",
                "stderr", "ptmx", "pts", "shm"
            ]
            .contains(d),
            "unexpected /dev entry {d}: {devs:?}"
        );
    }
    t.assert_no_leaks().await;
    t.cleanup();
}

/// Write to system directories; effective capabilities; no_new_privs; seccomp.
#[tokio::test]
async fn cannot_write_system_dirs_and_has_no_capabilities() {
    if skip("cannot_write_system_dirs_and_has_no_capabilities", false) {
        return;
    }
    let t = sandbox("esc-write", 2);
    let script = r#"
        for d in / /usr /usr/bin /bin /lib /etc /etc/ssl /.sparkla /dev /proc/sys/kernel; do
          if touch "$d/sparkla-probe" 2>/dev/null; then echo "WROTE $d"; fi
        done
        if echo x > /.sparkla/agent 2>/dev/null; then echo "WROTE agent"; fi
        if echo 1 > /proc/sys/kernel/sysrq 2>/dev/null; then echo "WROTE sysctl"; fi
        grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
        id -u; id -g
        touch /tmp/ok && touch ~/ok && touch /dev/shm/ok && echo writable-scratch
    "#;
    let (code, out) = sh_in(&t.rt, spec("esc-write"), script).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("WROTE"), "wrote to a system directory: {out}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = out.lines().find(|l| l.starts_with(cap)).expect(cap);
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("\n1000\n1000\n"), "not uid/gid 1000: {out}");
    assert!(out.contains("writable-scratch"), "{out}");
    t.assert_no_leaks().await;
    t.cleanup();
}

/// See or signal host processes.
#[tokio::test]
async fn cannot_see_or_signal_host_processes() {
    if skip("cannot_see_or_signal_host_processes", false) {
        return;
    }
    let t = sandbox("esc-procs", 3);
    let me = std::process::id();
    let script = format!(
        r#"ls /proc | grep -E '^[0-9]+$' | tr '\n' ' '; echo
           if kill -0 {me} 2>/dev/null; then echo "SIGNALLED {me}"; fi
           if kill -0 -1 2>/dev/null; then echo "kill -1 reached something"; fi
           echo "pid1=$(cat /proc/1/comm)"
           echo "cg=$(cat /proc/self/cgroup | tr '\n' ' ')" "#
    );
    let (code, out) = sh_in(&t.rt, spec("esc-procs"), &script).await;
    assert_eq!(code, 0, "{out}");
    let pids: Vec<u32> = out
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.len() <= 6 && pids.contains(&1),
        "sandbox sees many processes: {pids:?}"
    );
    assert!(!out.contains("SIGNALLED"), "{out}");
    assert!(
        out.contains("pid1=bash"),
        "the sandbox's own init is not PID 1: {out}"
    );
    // The cgroup namespace hides the host's cgroup paths.
    assert!(!out.contains("sparkla-test"), "{out}");
    t.assert_no_leaks().await;
    t.cleanup();
}

/// Connect to a host loopback listener (standing for the Sparkla server's own port).
#[tokio::test]
async fn cannot_reach_host_loopback() {
    if skip("cannot_reach_host_loopback", false) {
        return;
    }
    let t = sandbox("esc-net", 4);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let script = format!(
        r#"for h in 127.0.0.1 10.0.2.2 localhost; do
             if timeout 3 bash -c "exec 3<>/dev/tcp/$h/{port}" 2>/dev/null; then echo "CONNECTED $h"; fi
           done
           ip -o link 2>/dev/null | awk '{{print $2}}' | tr '\n' ' '; echo
           echo done"#
    );
    let (code, out) = sh_in(&t.rt, spec("esc-net"), &script).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("done"), "{out}");
    assert!(
        !out.contains("CONNECTED"),
        "reached the host listener: {out}"
    );
    assert!(
        listener.accept().is_err(),
        "the host listener accepted a connection"
    );
    assert!(
        out.lines().any(|l| l.trim() == "lo:"),
        "interfaces other than lo: {out}"
    );

    // With network allowed (slirp4netns, host loopback disabled), the host's loopback
    // stays unreachable. No traffic leaves the machine: only loopback addresses are tried.
    if std::path::Path::new("/usr/bin/slirp4netns").exists() {
        let mut s = spec("esc-net-on");
        s.network = true;
        let (code, out) = sh_in(&t.rt, s, &script).await;
        assert_eq!(code, 0, "{out}");
        assert!(
            !out.contains("CONNECTED"),
            "network session reached host loopback: {out}"
        );
        assert!(out.contains("tap0"), "no tap0 with network allowed: {out}");
        assert!(
            listener.accept().is_err(),
            "the host listener accepted a connection"
        );
    } else {
        eprintln!("SKIPPED (part): network-allowed case: slirp4netns is not installed");
    }
    t.assert_no_leaks().await;
    t.cleanup();
}

/// mount, nested user namespaces, ptrace, kernel log, cgroup files, hostname.
#[tokio::test]
async fn kernel_facilities_are_refused() {
    if skip("kernel_facilities_are_refused", false) {
        return;
    }
    let t = sandbox("esc-kernel", 5);
    let script = r#"
        mount -t tmpfs none /tmp 2>/dev/null && echo "MOUNTED"
        unshare -U true 2>/dev/null && echo "USERNS"
        unshare -r true 2>/dev/null && echo "USERNS-ROOT"
        /usr/bin/python3 - <<'EOF'
import ctypes, os, errno
libc = ctypes.CDLL(None, use_errno=True)
# ptrace(PTRACE_TRACEME) and ptrace(PTRACE_ATTACH, 1)
for req, pid in [(0, 0), (16, 1)]:
    if libc.ptrace(req, pid, 0, 0) == 0:
        print("PTRACE", req)
# unshare(CLONE_NEWUSER) and clone3
if libc.unshare(0x10000000) == 0:
    print("UNSHARE")
try:
    os.unshare(os.CLONE_NEWNS)
    print("UNSHARE-NS")
except (OSError, AttributeError):
    pass
# bpf, perf_event_open, keyctl, userfaultfd, open_by_handle_at, syslog, reboot, setns
for name, nr in [("bpf", 321), ("perf_event_open", 298), ("keyctl", 250), ("userfaultfd", 323), ("open_by_handle_at", 304), ("syslog", 103), ("setns", 308), ("init_module", 175), ("kexec_load", 246), ("add_key", 248), ("swapon", 167), ("clock_settime", 227)]:
    r = libc.syscall(nr, 0, 0, 0, 0, 0)
    e = ctypes.get_errno()
    if r >= 0 or e != errno.EPERM:
        print("SYSCALL", name, r, e)
print("python-done")
EOF
        dmesg >/dev/null 2>&1 && echo "DMESG"
        cat /dev/kmsg >/dev/null 2>&1 && echo "KMSG"
        cat /proc/kmsg >/dev/null 2>&1 && echo "PROCKMSG"
        ls /sys/fs/cgroup >/dev/null 2>&1 && echo "CGROUPFS"
        echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo "SYSCTL"
        hostname evil 2>/dev/null && echo "SETHOSTNAME"
        echo "host=$(hostname)"
        echo done
    "#;
    let (code, out) = sh_in(&t.rt, spec("esc-kernel"), script).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("python-done") && out.contains("done"), "{out}");
    for bad in [
        "MOUNTED",
        "USERNS",
        "PTRACE",
        "UNSHARE",
        "SYSCALL",
        "DMESG",
        "KMSG",
        "CGROUPFS",
        "SYSCTL",
        "SETHOSTNAME",
    ] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }
    assert!(out.contains("host=sparkla"), "{out}");
    t.assert_no_leaks().await;
    t.cleanup();
}

/// One session seeing another's files or processes.
#[tokio::test]
async fn sessions_are_isolated_from_each_other() {
    if skip("sessions_are_isolated_from_each_other", false) {
        return;
    }
    let t = sandbox("esc-cross", 6);
    // Session A writes files and keeps running.
    let mut a = t
        .rt
        .start_command(
            spec("esc-cross-a"),
            vec![
                "/bin/bash".into(),
                "-c".into(),
                "echo secret-a > /tmp/secret-a; echo secret-a > ~/secret-a; echo ready; exec sleep 1000".into(),
            ],
        )
        .await
        .unwrap();
    let (mut ra, _wa) = a.take_stream().unwrap();
    let mut buf = [0u8; 6];
    tokio::io::AsyncReadExt::read_exact(&mut ra, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"ready\n");
    let (code, out) = sh_in(
        &t.rt,
        spec("esc-cross-b"),
        r#"grep -rs secret-a / --exclude-dir=proc --exclude-dir=usr --exclude-dir=sys | head -3
           ps -eo comm | grep -c sleep || true"#,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("secret-a"), "session B saw A's files: {out}");
    assert_eq!(out.trim(), "0", "session B saw A's processes: {out}");
    // Each live session runs under host ids of its own.
    let mut c =
        t.rt.start_command(
            spec("esc-cross-c"),
            vec!["/bin/sleep".into(), "1000".into()],
        )
        .await
        .unwrap();
    let host_uid = |pid: i32| -> u32 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .unwrap()
    };
    let (ua, uc) = (host_uid(a.agent_pid()), host_uid(c.agent_pid()));
    assert_ne!(ua, uc, "two sessions share host uid {ua}");
    assert!(
        ua >= 65_536 && uc >= 65_536,
        "a session runs as a low host uid: {ua} {uc}"
    );
    c.stop().await.unwrap();
    a.stop().await.unwrap();
    t.assert_no_leaks().await;
    t.cleanup();
}

// ------------------------------------------------------------------------------------
// Limits

/// A 1 GiB allocation under a 0.25 GiB limit fails in the session only.
#[tokio::test]
async fn memory_limit_fails_in_the_session_only() {
    if skip("memory_limit_fails_in_the_session_only", false) {
        return;
    }
    let t = sandbox("lim-mem", 7);
    let mut s = spec("lim-mem-small");
    s.limits = Limits {
        memory_bytes: Some(256 << 20),
        ..Default::default()
    };
    let mut neighbour =
        t.rt.start_command(
            spec("lim-mem-neighbour"),
            vec!["/bin/sleep".into(), "1000".into()],
        )
        .await
        .unwrap();
    let (code, out, mut inst) = sh_keep(
        &t.rt,
        s,
        "/usr/bin/python3 -c 'b = bytearray(1 << 30)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint(\"ALLOCATED\")'; echo exit=$?",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("ALLOCATED"),
        "1 GiB allocated under 256 MiB: {out}"
    );
    let oom = inst.oom_kills().await;
    assert!(
        oom > 0 || out.contains("MemoryError"),
        "no OOM kill and no MemoryError: {out}"
    );
    // The shell around it survived (only the allocating process died) and so did a
    // neighbour session.
    assert!(out.contains("exit="), "{out}");
    inst.stop().await.unwrap();
    assert_eq!(
        neighbour.state().await,
        sparkla_runtime::InstanceState::Running,
        "the neighbour session died"
    );
    neighbour.stop().await.unwrap();
    let (code, out) = sh_in(
        &t.rt,
        spec("lim-mem-after"),
        "/usr/bin/python3 -c 'print(1+1)'",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "2"));
    t.assert_no_leaks().await;
    t.cleanup();
}

/// A bash fork bomb is contained by the pids limit while the host stays responsive.
#[tokio::test]
async fn fork_bomb_is_contained() {
    if skip("fork_bomb_is_contained", false) {
        return;
    }
    let t = sandbox("lim-fork", 8);
    let mut s = spec("lim-fork");
    s.limits.pids = Some(128);
    let mut inst =
        t.rt.start_command(
            s,
            vec![
                "/bin/bash".into(),
                "-c".into(),
                "bomb() { bomb | bomb & }; bomb; sleep 1000".into(),
            ],
        )
        .await
        .unwrap();
    // Let it rage for a while; the host must keep spawning processes meanwhile.
    let started = Instant::now();
    let mut host_spawns = 0;
    let mut max_pids = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let ok = std::process::Command::new("/bin/true")
            .status()
            .unwrap()
            .success();
        assert!(ok, "the host could not spawn a process");
        host_spawns += 1;
        max_pids = max_pids.max(inst.cgroup().pids().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        host_spawns > 10,
        "host spawned only {host_spawns} processes in 3 s"
    );
    assert!(
        max_pids > 50,
        "the fork bomb did not run ({max_pids} processes)"
    );
    assert!(max_pids <= 128, "the pids limit did not hold: {max_pids}");
    let stop_started = Instant::now();
    inst.stop().await.unwrap();
    eprintln!(
        "fork bomb: max {max_pids} processes, {host_spawns} host spawns meanwhile, stopped in {:?}",
        stop_started.elapsed()
    );
    t.assert_no_leaks().await;
    t.cleanup();
}

/// A CPU busy loop under a 0.25-core quota gets about a quarter of a core.
#[tokio::test]
async fn cpu_quota_holds() {
    if skip("cpu_quota_holds", false) {
        return;
    }
    let t = sandbox("lim-cpu", 9);
    let mut s = spec("lim-cpu");
    s.limits.cpu_cores = Some(0.25);
    let mut inst =
        t.rt.start_command(
            s,
            vec![
                "/bin/bash".into(),
                "-c".into(),
                "while :; do :; done".into(),
            ],
        )
        .await
        .unwrap();
    let Some(u0) = inst.cgroup().cpu_usage_usec() else {
        eprintln!("SKIPPED (part): cpu_quota_holds: no cpu accounting (cpuacct) on this host");
        inst.stop().await.unwrap();
        t.cleanup();
        return;
    };
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = inst.cgroup().cpu_usage_usec().unwrap() - u0;
    let wall = t0.elapsed().as_micros() as f64;
    let share = used as f64 / wall;
    eprintln!(
        "cpu quota 0.25: measured {share:.3} cores over {:.1} s",
        wall / 1e6
    );
    assert!(
        (0.15..=0.35).contains(&share),
        "a busy loop under a 0.25-core quota used {share:.3} cores"
    );
    inst.stop().await.unwrap();
    t.assert_no_leaks().await;
    t.cleanup();
}

/// A 2 GiB write stops at the session's scratch bound (default 1 GiB).
#[tokio::test]
async fn disk_write_stops_at_the_bound() {
    if skip("disk_write_stops_at_the_bound", false) {
        return;
    }
    let t = sandbox("lim-disk", 10);
    let (code, out) = sh_in(
        &t.rt,
        spec("lim-disk"),
        r#"dd if=/dev/zero of=/tmp/big bs=1M count=2048 2>&1 | grep -o 'No space left on device' | head -1
           echo "size=$(stat -c %s /tmp/big)"
           dd if=/dev/zero of=$HOME/more bs=1M count=10 2>&1 | grep -c 'No space' "#,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    let size: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("size="))
        .and_then(|s| s.trim().parse().ok())
        .expect("size");
    assert!(size <= 1 << 30, "wrote {size} bytes past the 1 GiB bound");
    assert!(
        size > 900 << 20,
        "the bound is much smaller than 1 GiB: {size}"
    );
    // Home shares the bound with /tmp.
    assert_eq!(out.lines().last().unwrap().trim(), "1", "{out}");
    t.assert_no_leaks().await;
    t.cleanup();
}
