//! The sandbox runtime with the real agent: the conformance suite, the warm pool, volume
//! mounts, environment directories, leaks after many sessions, and the start-up sweep.
//! Needs root and a built `sparkla-agent`; prints SKIPPED otherwise.

mod common;

use common::conformance::{self, begin, exec, outputs, text};
use common::{config, sandbox, sandbox_with, sh_in, skip, spec};
use serde_json::json;
use sparkla_runtime::sandbox::SandboxRuntime;
use sparkla_runtime::{
    validate_mounts, Instance, InstanceState, Limits, Mount, Pool, PoolConfig, Runtime,
    RuntimeError,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    if skip("conformance_suite", true) {
        return;
    }
    let t = sandbox("conf", 20);
    conformance::run_all(t.rt.as_ref(), "conf").await;
    t.assert_no_leaks().await;
    t.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported_in_state_and_errors() {
    if skip("oom_kill_is_reported_in_state_and_errors", true) {
        return;
    }
    let t = sandbox("oom", 21);
    let mut s = spec("oom");
    s.limits.memory_bytes = Some(128 << 20);
    let (mut inst, client) = begin(t.rt.as_ref(), s).await.unwrap();
    // numpy allocates outside Python's allocator: the kernel's OOM killer acts.
    let node = exec(
        &client,
        "python",
        "import numpy as np\na = np.ones(1 << 28)\na.sum()",
    )
    .await;
    assert!(!conformance::errors(&node).is_empty(), "{node}");
    assert!(inst.oom_kills().await > 0, "no OOM kill counted: {node}");
    // The session still answers (the agent restarts its kernel) or says it is gone.
    let after = client
        .execute("after", conformance::chunk("python", "1+2"), None)
        .await;
    if let Ok(n) = after {
        assert_eq!(outputs(&n), vec![json!(3)], "{n}");
    } else {
        assert!(matches!(inst.state().await, InstanceState::Exited { .. }));
    }
    inst.stop().await.unwrap();
    t.assert_no_leaks().await;
    t.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_hands_out_warm_sessions() {
    if skip("pool_hands_out_warm_sessions", true) {
        return;
    }
    let t = sandbox("pool", 22);
    let rt: Arc<dyn Runtime> = t.rt.clone();
    let pool = Pool::new(
        rt,
        PoolConfig {
            size: 2,
            ..Default::default()
        },
    );
    assert!(
        pool.wait_full(Duration::from_secs(60)).await,
        "pool never filled"
    );
    assert_eq!(pool.idle(), 2);

    // A default session comes from the pool: the python kernel is already running.
    let (mut inst, client) = pool.begin(spec("pool-s1")).await.unwrap();
    assert_eq!(inst.session_id(), "pool-s1");
    let status = client.call("status", json!({})).await.unwrap();
    assert!(
        status["kernels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["language"] == "python"),
        "python kernel not warm: {status}"
    );
    assert_eq!(
        outputs(&exec(&client, "python", "1+1").await),
        vec![json!(2)]
    );

    // Limits are applied at hand-out.
    let mut s = spec("pool-s2");
    s.limits.memory_bytes = Some(200 << 20);
    let (mut inst2, client2) = pool.begin(s).await.unwrap();
    let status = client2.call("status", json!({})).await.unwrap();
    assert!(
        !status["kernels"].as_array().unwrap().is_empty(),
        "not from the pool: {status}"
    );
    let node = exec(
        &client2,
        "python",
        "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nlen(b)",
    )
    .await;
    assert!(
        !conformance::errors(&node).is_empty(),
        "the hand-out limit did not hold: {node}"
    );

    // A session with a mount is a cold start (not from the pool) and still works.
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("pool-s3");
    s.mounts = vec![Mount {
        source: dir.path().to_path_buf(),
        destination: "/data".into(),
        read_only: true,
    }];
    let (mut inst3, client3) = pool.begin(s).await.unwrap();
    let status = client3.call("status", json!({})).await.unwrap();
    assert!(status["kernels"].as_array().unwrap().is_empty(), "{status}");

    // The pool refills.
    assert!(
        pool.wait_full(Duration::from_secs(60)).await,
        "pool did not refill"
    );
    for i in [&mut inst, &mut inst2, &mut inst3] {
        i.stop().await.unwrap();
    }
    pool.shutdown().await;
    t.assert_no_leaks().await;
    t.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_mounts_read_only_and_read_write() {
    if skip("volume_mounts_read_only_and_read_write", true) {
        return;
    }
    let t = sandbox("mounts", 23);
    let allowed = tempfile::tempdir().unwrap();
    let ro = allowed.path().join("ro");
    let rw = allowed.path().join("rw");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("input.txt"), "from the host").unwrap();
    // Writable for the session's uid, whichever host id range it gets.
    std::fs::set_permissions(&rw, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mounts = validate_mounts(
        &[
            Mount {
                source: ro.clone(),
                destination: "/data/in".into(),
                read_only: true,
            },
            Mount {
                source: rw.clone(),
                destination: "/data/out".into(),
                read_only: false,
            },
        ],
        &[allowed.path().to_path_buf()],
    )
    .unwrap();
    let mut s = spec("mounts");
    s.mounts = mounts;
    let (mut inst, client) = begin(t.rt.as_ref(), s).await.unwrap();
    let out = exec(
        &client,
        "bash",
        "cat /data/in/input.txt; echo; touch /data/in/x 2>/dev/null && echo RO-WRITABLE; echo result > /data/out/r.txt && echo wrote",
    )
    .await;
    assert_eq!(text(&out), "from the host\nwrote\n", "{out}");
    assert_eq!(
        std::fs::read_to_string(rw.join("r.txt")).unwrap(),
        "result\n"
    );
    inst.stop().await.unwrap();

    // Outside the allow-list: refused with a clear error.
    let e = validate_mounts(
        &[Mount {
            source: "/etc".into(),
            destination: "/data".into(),
            read_only: true,
        }],
        &[allowed.path().to_path_buf()],
    )
    .unwrap_err();
    assert!(matches!(e, RuntimeError::Refused(_)), "{e}");
    t.assert_no_leaks().await;
    t.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_directories() {
    if skip("environment_directories", false) {
        return;
    }
    // A small environment: the host's /usr (bind) and its links, plus an /etc of its own,
    // is enough to show that the session's root comes from the directory.
    let envs = tempfile::tempdir().unwrap();
    let env = envs.path().join("mini");
    std::fs::create_dir_all(env.join("etc")).unwrap();
    std::fs::create_dir_all(env.join("usr")).unwrap();
    std::fs::write(env.join("etc/os-release"), "ID=sparkla-mini\n").unwrap();
    std::fs::write(env.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    for l in ["bin", "lib", "lib64", "sbin"] {
        if let Ok(target) = std::fs::read_link(format!("/{l}")) {
            std::os::unix::fs::symlink(target, env.join(l)).unwrap();
        }
    }
    let mut cfg = config("envdir", 24);
    cfg.environments = envs.path().to_path_buf();
    let t = sandbox_with(cfg);
    // The env's /usr is empty: bind the host's over it for the test via a mount.
    let mut s = spec("envdir");
    s.environment = Some("mini".into());
    s.mounts = vec![Mount {
        source: "/usr".into(),
        destination: "/usr".into(),
        read_only: true,
    }];
    // /usr is reserved for validated mounts, but the runtime itself takes the spec as given:
    // this checks the environment mechanics, not the allow-list.
    let (code, out) = sh_in(
        &t.rt,
        s,
        "cat /etc/os-release; grep -c user /etc/passwd; ls /",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ID=sparkla-mini"), "{out}");
    t.rt.prepare(Some("mini")).await.unwrap();
    let e = t.rt.prepare(Some("nope")).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Environment { .. }), "{e}");
    let e = t.rt.prepare(Some("../etc")).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Environment { .. }), "{e}");
    t.assert_no_leaks().await;
    t.cleanup();
}

/// Many sessions, some with background processes, some crashed (agent killed, launcher
/// killed, dropped without stop): nothing remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leaks_after_many_sessions() {
    if skip("no_leaks_after_many_sessions", true) {
        return;
    }
    let t = sandbox("leaks", 25);
    for i in 0..12 {
        let (mut inst, client) = begin(t.rt.as_ref(), spec(&format!("leaks-{i}")))
            .await
            .unwrap();
        match i % 4 {
            0 => {
                exec(&client, "bash", "(sleep 1000 &); setsid sleep 1001 &").await;
                inst.stop().await.unwrap();
            }
            1 => {
                // The agent (PID 1 of the sandbox) crashes: killed from the host.
                exec(&client, "bash", "sleep 1000 &").await;
                drop(client);
                inst.stop().await.unwrap();
                let mut sb =
                    t.rt.start_sandbox(spec(&format!("leaks-{i}-crash")))
                        .await
                        .unwrap();
                let (r, w) = sb.take_stream().unwrap();
                let c = sparkla_runtime::AgentClient::new(r, w);
                c.ready().await.unwrap();
                exec(&c, "bash", "sleep 1000 &").await;
                // SAFETY: kill(2) on the sandbox's init, seen from the host.
                unsafe { libc::kill(sb.agent_pid(), libc::SIGKILL) };
                let reason = c.closed().await;
                assert!(!reason.is_empty());
                for _ in 0..200 {
                    if matches!(sb.state().await, InstanceState::Exited { .. }) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(
                    matches!(sb.state().await, InstanceState::Exited { .. }),
                    "crashed sandbox still running"
                );
                sb.stop().await.unwrap();
            }
            2 => {
                // Dropped without stop (e.g. a panicking task).
                exec(&client, "bash", "sleep 1000 &").await;
                drop(client);
                drop(inst);
            }
            _ => {
                exec(
                    &client,
                    "python",
                    "import subprocess; subprocess.Popen(['sleep', '1000'])",
                )
                .await;
                client.shutdown().await.ok();
                inst.stop().await.unwrap();
            }
        }
    }
    t.assert_no_leaks().await;
    t.cleanup();
}

/// After a "crash" (sessions left running, runtime forgotten), a new runtime's sweep
/// reclaims everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_reclaims_a_crashed_servers_sessions() {
    if skip("sweep_reclaims_a_crashed_servers_sessions", false) {
        return;
    }
    let t = sandbox("sweep", 26);
    let mut leaked = Vec::new();
    for i in 0..3 {
        let inst =
            t.rt.start_command(
                spec(&format!("sweep-{i}")),
                vec![
                    "/bin/bash".into(),
                    "-c".into(),
                    "sleep 1000 & sleep 1000".into(),
                ],
            )
            .await
            .unwrap();
        leaked.push(inst);
    }
    // Simulate the crash: forget the instances (no Drop, no stop).
    for inst in leaked {
        std::mem::forget(inst);
    }
    std::fs::write(t.state_dir.join("stale-file"), "x").unwrap();
    assert_eq!(t.rt.cgroups().children().len(), 3);
    assert!(!t.leaks().is_empty());

    let again = SandboxRuntime::new(config("sweep", 26)).unwrap();
    let report = again.sweep().await.unwrap();
    assert_eq!(report.cgroups, 3, "{report:?}");
    assert!(report.processes >= 3, "{report:?}");
    assert_eq!(report.directories, 1, "{report:?}");
    t.assert_no_leaks().await;
    t.cleanup();
}

#[tokio::test]
async fn refuses_clearly_without_root() {
    if common::is_root() {
        // As root, check the other refusals the constructor makes instead.
        let mut cfg = config("refuse", 27);
        cfg.launcher = Some(PathBuf::from("/nonexistent/sparkla-sandbox"));
        let e = SandboxRuntime::new(cfg).err().expect("refused");
        assert!(matches!(e, RuntimeError::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        let t = sandbox("refuse", 27);
        let e = t.rt.start(spec("bad/id")).await.err().expect("refused");
        assert!(matches!(e, RuntimeError::Refused(_)), "{e}");
        t.cleanup();
        return;
    }
    let e = SandboxRuntime::new(config("refuse", 27))
        .err()
        .expect("refused");
    assert!(matches!(e, RuntimeError::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains("needs root"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_agent_sessions() {
    if skip("limits_apply_to_agent_sessions", true) {
        return;
    }
    let t = sandbox("lims", 28);
    let mut s = spec("lims");
    s.limits = Limits {
        cpu_cores: Some(0.5),
        memory_bytes: Some(300 << 20),
        pids: Some(64),
        scratch_bytes: Some(64 << 20),
    };
    let (mut inst, client) = begin(t.rt.as_ref(), s).await.unwrap();
    let out = exec(
        &client,
        "bash",
        "df -B1 --output=size /tmp | tail -1; for i in $(seq 80); do sleep 5 & done 2>&1 | grep -c 'fork: ' ; wait",
    )
    .await;
    let t_out = text(&out);
    let mut lines = t_out.lines();
    let size: u64 = lines.next().unwrap().trim().parse().unwrap();
    assert_eq!(size, 64 << 20, "{out}");
    let failed_forks: u64 = lines.next().unwrap_or("0").trim().parse().unwrap_or(0);
    assert!(
        failed_forks > 0 || !conformance::errors(&out).is_empty(),
        "80 background processes under pids=64 all started: {out}"
    );
    inst.stop().await.unwrap();
    t.assert_no_leaks().await;
    t.cleanup();
}

/// A "server" (this test binary, re-executed) starts sessions and is killed with SIGKILL:
/// its sandboxes die with it (PR_SET_PDEATHSIG chain), and the next start's sweep removes
/// the cgroups it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crash_kills_sessions_and_sweep_reclaims() {
    if std::env::var_os("SPARKLA_CRASH_HELPER").is_some() {
        // The helper: start sessions, say so, wait to be killed.
        let t = sandbox("crash", 29);
        let mut keep = Vec::new();
        for i in 0..3 {
            let (inst, client) = begin(t.rt.as_ref(), spec(&format!("crash-{i}")))
                .await
                .unwrap();
            exec(&client, "bash", "sleep 1000 &").await;
            keep.push((inst, client));
        }
        println!("SESSIONS-READY");
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }
    if skip("server_crash_kills_sessions_and_sweep_reclaims", true) {
        return;
    }
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "server_crash_kills_sessions_and_sweep_reclaims",
            "--nocapture",
        ])
        .env("SPARKLA_CRASH_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(helper.stdout.take().unwrap());
    let mut ready = false;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0 {
        if line.contains("SESSIONS-READY") {
            ready = true;
            break;
        }
        line.clear();
    }
    assert!(ready, "the helper did not start its sessions");
    let base = config("crash", 29).host_id_base;
    assert!(
        common::processes_in_uid_range(base, common::ID_WINDOW).len() >= 6,
        "sessions not running"
    );
    helper.kill().unwrap(); // SIGKILL: no destructor, no stop.
    helper.wait().unwrap();
    // Every session process dies with the server.
    let mut left = common::processes_in_uid_range(base, common::ID_WINDOW);
    for _ in 0..200 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = common::processes_in_uid_range(base, common::ID_WINDOW);
    }
    assert!(left.is_empty(), "sessions outlived the server: {left:#?}");
    // Their cgroups are left; the next server's sweep removes them.
    let t = sandbox("crash", 29);
    assert_eq!(t.rt.cgroups().children().len(), 3);
    let report = t.rt.sweep().await.unwrap();
    assert_eq!(report.cgroups, 3, "{report:?}");
    t.assert_no_leaks().await;
    t.cleanup();
}
