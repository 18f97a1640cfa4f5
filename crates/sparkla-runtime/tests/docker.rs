//! The Docker runtime against the real Docker engine: the conformance suite, the applied
//! HostConfig, limits, the escape battery's container cases, death detection, sweep.
//!
//! Needs a reachable engine (DOCKER_HOST or /var/run/docker.sock), the default image
//! (`scripts/build-docker-env.sh`) and the agent binary (`cargo build -p sparkla-agent`).
//! When one is missing the tests print SKIPPED loudly; with SPARKLA_REQUIRE_DOCKER=1 (CI)
//! they fail instead.

#[path = "common/conformance.rs"]
mod conformance;

use bollard::query_parameters::{KillContainerOptionsBuilder, ListContainersOptionsBuilder};
use conformance::{begin, end, errors, exec, outputs, spec, text};
use serde_json::{json, Value};
use sparkla_runtime::docker::{DockerConfig, DockerRuntime, DEFAULT_IMAGE, LABEL_SERVER};
use sparkla_runtime::{InstanceSpec, InstanceState, Limits, Mount, Runtime, RuntimeError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn skip(test: &str, why: &str) {
    if std::env::var("SPARKLA_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
        panic!("{test}: {why} (SPARKLA_REQUIRE_DOCKER=1)");
    }
    // Straight to fd 2: libtest captures eprintln! of passing tests, this stays visible.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n******** SKIPPED: docker test {test} because {why} ********\n"
    );
}

fn server_id(test: &str) -> String {
    format!("test-{test}-{}", std::process::id())
}

/// A runtime for `test` with the real agent, or None (SKIPPED printed).
async fn runtime(test: &str) -> Option<DockerRuntime> {
    let Some(agent) = sparkla_runtime::process::find_agent() else {
        skip(
            test,
            "the sparkla-agent binary is not built (cargo build -p sparkla-agent)",
        );
        return None;
    };
    runtime_with(test, agent).await
}

/// A runtime for `test` whose "agent" is `agent` (e.g. /bin/cat to test the plumbing).
async fn runtime_with(test: &str, agent: PathBuf) -> Option<DockerRuntime> {
    let mut config = DockerConfig::new(server_id(test));
    config.agent = Some(agent);
    let rt = match DockerRuntime::new(config).await {
        Ok(rt) => rt,
        Err(e) => {
            skip(test, &format!("the Docker engine is not usable: {e}"));
            return None;
        }
    };
    if let Err(e) = rt.prepare(None).await {
        skip(
            test,
            &format!("{e} (run scripts/build-docker-env.sh to build {DEFAULT_IMAGE})"),
        );
        return None;
    }
    Some(rt)
}

/// The containers of this runtime's server id, running or not.
async fn containers(rt: &DockerRuntime) -> Vec<String> {
    let mut filters = HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("{LABEL_SERVER}={}", rt.config().server_id)],
    );
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    rt.client()
        .list_containers(Some(opts))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn assert_none_left(rt: &DockerRuntime) {
    let left = containers(rt).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

fn cat() -> PathBuf {
    // The host's cat, dynamically linked: fine in the bookworm image (same libc ABI).
    PathBuf::from("/bin/cat")
}

#[tokio::test]
async fn unreachable_engine_is_unavailable_and_names_the_socket() {
    let mut config = DockerConfig::new(server_id("unreachable"));
    config.agent = Some(cat());
    config.host = Some("unix:///nonexistent/sparkla-test/docker.sock".into());
    let err = DockerRuntime::new(config)
        .await
        .expect_err("connected to nothing");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            RuntimeError::Unavailable {
                runtime: "docker",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("/nonexistent/sparkla-test/docker.sock"),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_image_names_the_image_and_the_build_command() {
    let Some(rt) = runtime_with("missing-image", cat()).await else {
        return;
    };
    let image = "sparkla/does-not-exist:never";
    let err = rt
        .image_info(Some(image))
        .await
        .expect_err("info of a missing image");
    assert!(
        err.to_string().contains("sparkla env build docker"),
        "{err}"
    );
    // The default image's identity: one layer, the reproducible root filesystem.
    let info = rt.image_info(None).await.expect("image info");
    assert_eq!(info.name, DEFAULT_IMAGE);
    assert!(info.id.starts_with("sha256:"), "{info:?}");
    assert!(
        !info.layers.is_empty() && info.layers[0].starts_with("sha256:"),
        "{info:?}"
    );
    let err = rt
        .prepare(Some(image))
        .await
        .expect_err("prepared a missing image");
    assert!(matches!(err, RuntimeError::Environment { .. }), "{err:?}");
    let mut s = spec("missing-image");
    s.environment = Some(image.into());
    let err = match rt.start(s).await {
        Ok(_) => panic!("started a missing image"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, RuntimeError::Environment { .. }), "{err:?}");
    assert!(msg.contains(image), "{msg}");
    assert!(msg.contains("sparkla env build docker"), "{msg}");
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn attach_transport_round_trips_bytes() {
    let Some(rt) = runtime_with("transport", cat()).await else {
        return;
    };
    let mut inst = rt.start(spec("echo")).await.expect("start");
    let (mut read, mut write) = inst.take_stream().expect("stream");
    assert!(inst.take_stream().is_none(), "stream handed out twice");
    // A line, then 1 MiB spanning many attach frames, byte for byte.
    let mut payload = b"hello\n".to_vec();
    payload.extend((0..(1 << 20)).map(|i| b'a' + (i % 26) as u8));
    payload.push(b'\n');
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.unwrap();
        write.flush().await.unwrap();
        write
    });
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(60), read.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .expect("read");
    assert!(got == expected, "echoed bytes differ");
    let _write = writer.await.unwrap();
    assert_eq!(inst.state().await, InstanceState::Running);
    inst.stop().await.expect("stop");
    assert!(matches!(inst.state().await, InstanceState::Exited { .. }));
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn host_config_is_applied() {
    let Some(rt) = runtime_with("hostconfig", cat()).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("hc");
    s.limits = Limits {
        cpu_cores: Some(0.5),
        memory_bytes: Some(512 << 20),
        pids: Some(77),
        scratch_bytes: Some(32 << 20),
    };
    s.mounts = vec![Mount {
        source: dir.path().to_path_buf(),
        destination: "/data".into(),
        read_only: true,
    }];
    let mut inst = rt.start(s).await.expect("start");
    let name = format!("sparkla-{}-hc", rt.config().server_id);
    let info = rt
        .client()
        .inspect_container(&name, None)
        .await
        .expect("inspect");
    let hc = info.host_config.expect("host config");
    assert_eq!(hc.memory, Some(512 << 20));
    assert_eq!(hc.memory_swap, Some(512 << 20), "swap on top of memory");
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.pids_limit, Some(77));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
    assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_string()]));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert_eq!(hc.readonly_rootfs, Some(true));
    let tmpfs = hc.tmpfs.expect("tmpfs");
    assert!(
        tmpfs["/tmp"].contains(&format!("size={}", 32 << 20)),
        "{tmpfs:?}"
    );
    assert!(tmpfs["/home/sparkla"].contains("uid=1000"), "{tmpfs:?}");
    let mounts = hc.mounts.expect("mounts");
    assert!(
        mounts
            .iter()
            .any(|m| m.target.as_deref() == Some("/.sparkla/agent") && m.read_only == Some(true)),
        "{mounts:?}"
    );
    assert!(
        mounts.iter().any(|m| m.target.as_deref() == Some("/data")
            && m.source.as_deref() == Some(dir.path().to_str().unwrap())
            && m.read_only == Some(true)),
        "{mounts:?}"
    );
    let config = info.config.expect("config");
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    let labels = config.labels.expect("labels");
    assert_eq!(labels["sparkla.session"], "hc");
    assert_eq!(labels["sparkla.server"], rt.config().server_id);
    assert_eq!(info.state.and_then(|s| s.running), Some(true));

    // set_limits (used by the warm pool) changes them on the running container.
    let changed = inst
        .set_limits(&Limits {
            cpu_cores: Some(0.25),
            memory_bytes: Some(256 << 20),
            pids: Some(55),
            scratch_bytes: None,
        })
        .await
        .expect("set_limits");
    assert!(changed);
    let hc = rt
        .client()
        .inspect_container(&name, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(hc.memory, Some(256 << 20));
    assert_eq!(hc.memory_swap, Some(256 << 20));
    assert_eq!(hc.nano_cpus, Some(250_000_000));
    assert_eq!(hc.pids_limit, Some(55));
    inst.stop().await.expect("stop");

    // With the network allowed, the container gets the default bridge.
    let mut s = spec("hc-net");
    s.network = true;
    let mut inst = rt.start(s).await.expect("start");
    let name = format!("sparkla-{}-hc-net", rt.config().server_id);
    let hc = rt
        .client()
        .inspect_container(&name, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(hc.network_mode.as_deref(), Some("bridge"));
    inst.stop().await.expect("stop");
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn kill_from_outside_is_detected_and_the_session_restarts() {
    let Some(rt) = runtime("killed").await else {
        return;
    };
    let (mut inst, client) = begin(&rt, spec("k")).await.expect("begin");
    assert_eq!(
        outputs(&exec(&client, "python", "1+1").await),
        vec![json!(2)]
    );
    let name = format!("sparkla-{}-k", rt.config().server_id);
    rt.client()
        .kill_container(
            &name,
            Some(KillContainerOptionsBuilder::new().signal("SIGKILL").build()),
        )
        .await
        .expect("docker kill");
    // The stream closes, a pending call fails, and the state says why.
    let reason = tokio::time::timeout(Duration::from_secs(30), client.closed())
        .await
        .expect("agent stream did not close after docker kill");
    assert!(!reason.is_empty());
    assert!(client
        .execute("after", conformance::chunk("python", "1"), None)
        .await
        .is_err());
    match inst.state().await {
        InstanceState::Exited { reason } => assert!(reason.contains("exited"), "{reason}"),
        s => panic!("killed container reported {s:?}"),
    }
    // Restart: the same session id starts afresh (the dead container is replaced).
    let (inst2, client2) = begin(&rt, spec("k")).await.expect("restart");
    assert_eq!(
        outputs(&exec(&client2, "python", "2+2").await),
        vec![json!(4)]
    );
    inst.stop().await.expect("stop dead"); // idempotent on a replaced container
    end(inst2, client2).await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn sweep_removes_this_servers_leftovers_only() {
    let Some(rt) = runtime_with("sweep", cat()).await else {
        return;
    };
    let Some(other) = runtime_with("sweep-other", cat()).await else {
        return;
    };
    // A crashed server: instances never stopped nor dropped.
    for i in 0..2 {
        let inst = rt
            .start(spec(&format!("leftover-{i}")))
            .await
            .expect("start");
        std::mem::forget(inst);
    }
    let mut theirs = other.start(spec("theirs")).await.expect("start");
    assert_eq!(containers(&rt).await.len(), 2);
    let report = rt.sweep().await.expect("sweep");
    assert_eq!(report.containers, 2, "{report:?}");
    assert_none_left(&rt).await;
    assert_eq!(
        containers(&other).await.len(),
        1,
        "swept another server's container"
    );
    assert_eq!(theirs.state().await, InstanceState::Running);
    theirs.stop().await.expect("stop");
    assert_eq!(rt.sweep().await.expect("sweep").containers, 0);
    assert_none_left(&other).await;
}

#[tokio::test]
async fn dropping_an_instance_removes_its_container() {
    let Some(rt) = runtime_with("drop", cat()).await else {
        return;
    };
    let inst = rt.start(spec("dropped")).await.expect("start");
    assert_eq!(containers(&rt).await.len(), 1);
    drop(inst);
    assert_none_left(&rt).await;
}

// ---- the conformance suite -------------------------------------------------------------

#[tokio::test]
async fn conformance_executes_each_language() {
    let Some(rt) = runtime("conf-lang").await else {
        return;
    };
    conformance::executes_each_language(&rt, "c").await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn conformance_state_persists() {
    let Some(rt) = runtime("conf-state").await else {
        return;
    };
    conformance::state_persists(&rt, "c").await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn conformance_memory_limit_holds() {
    let Some(rt) = runtime("conf-mem").await else {
        return;
    };
    conformance::memory_limit_holds(&rt, "c").await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn conformance_end_kills_background_processes() {
    let Some(rt) = runtime("conf-bg").await else {
        return;
    };
    conformance::end_kills_background_processes(&rt, "c").await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn two_gib_allocation_under_half_gib_fails_and_session_survives() {
    let Some(rt) = runtime("mem2g").await else {
        return;
    };
    let mut s = spec("m");
    s.limits.memory_bytes = Some(512 << 20);
    let (inst, client) = begin(&rt, s).await.expect("begin");
    let node = exec(
        &client,
        "python",
        "b = bytearray(2 << 30)\nfor i in range(0, len(b), 4096): b[i] = 1\nlen(b)",
    )
    .await;
    assert!(
        !errors(&node).is_empty(),
        "2 GiB allocated under 0.5 GiB: {node}"
    );
    assert!(!outputs(&node).contains(&json!(2u64 << 30)), "{node}");
    let oom = inst.oom_kills().await;
    let kind = errors(&node)[0]["errorType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("2 GiB under 0.5 GiB: oom_kills={oom} error={kind}");
    assert!(
        oom > 0 || kind == "MemoryError",
        "oom_kills={oom} node={node}"
    );
    // The agent (PID 1) survived and python works again (restarted kernel).
    assert_eq!(inst.state().await, InstanceState::Running);
    assert_eq!(
        outputs(&exec(&client, "python", "3*3").await),
        vec![json!(9)]
    );
    end(inst, client).await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn fork_bomb_is_contained() {
    let Some(rt) = runtime("forkbomb").await else {
        return;
    };
    let mut s = spec("f");
    s.limits.pids = Some(64);
    let (inst, client) = begin(&rt, s).await.expect("begin");
    // Forking stops at the limit with EAGAIN.
    let node = exec(
        &client,
        "python",
        r#"import os, time
pids, err = [], None
try:
    for i in range(1000):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
except OSError as e:
    err = type(e).__name__
for p in pids: os.kill(p, 9)
for p in pids: os.waitpid(p, 0)
print(len(pids), err)"#,
    )
    .await;
    let out = text(&node);
    let mut parts = out.split_whitespace();
    let n: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(n < 64, "forked {n} processes under a limit of 64: {node}");
    assert_eq!(parts.next(), Some("BlockingIOError"), "{node}");
    // A real fork bomb, left running: the session and the host stay usable, end reclaims it.
    exec(
        &client,
        "python",
        "import subprocess, time\nsubprocess.Popen(['bash', '-c', ':(){ :|:& };:'])\ntime.sleep(3)",
    )
    .await;
    assert_eq!(
        outputs(&exec(&client, "python", "6*7").await),
        vec![json!(42)]
    );
    end(inst, client).await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn escape_battery_container_cases() {
    let Some(rt) = runtime("escape").await else {
        return;
    };
    let mut s = spec("e");
    s.limits.scratch_bytes = Some(16 << 20);
    let (inst, client) = begin(&rt, s).await.expect("begin");
    let host_dir = env!("CARGO_MANIFEST_DIR");
    let code = format!(
        r#"import os, json, socket, subprocess
r = {{}}
def attempt(name, f):
    try:
        f(); r[name] = "allowed"
    except Exception as e:
        r[name] = type(e).__name__
r["uid"] = os.getuid()
st = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
r["capeff"] = st["CapEff"].strip()
r["capbnd"] = st["CapBnd"].strip()
r["nonewprivs"] = st["NoNewPrivs"].strip()
r["seccomp"] = st["Seccomp"].strip()
attempt("write_root", lambda: open("/usr/sparkla-escape", "w"))
attempt("write_agent", lambda: open("/.sparkla/agent", "ab"))
attempt("write_etc_passwd", lambda: open("/etc/passwd", "a"))
attempt("sysrq", lambda: open("/proc/sysrq-trigger", "w").write("h"))
attempt("net_connect", lambda: socket.create_connection(("10.0.2.2", 80), timeout=2))
attempt("net_dns", lambda: socket.getaddrinfo("deb.debian.org", 80))
r["interfaces"] = sorted(os.listdir("/sys/class/net"))
r["mount"] = subprocess.run(["mount", "-t", "tmpfs", "x", "/tmp"], capture_output=True).returncode
r["chroot"] = subprocess.run(["chroot", "/", "true"], capture_output=True).returncode
r["host_dir_visible"] = os.path.exists({host_dir:?})
r["docker_sock_visible"] = os.path.exists("/var/run/docker.sock")
def fill():
    with open("/tmp/fill", "wb") as f:
        for i in range(64): f.write(b"x" * (1 << 20))
attempt("fill_tmp_beyond_scratch", fill)
os.remove("/tmp/fill") if os.path.exists("/tmp/fill") else None
attempt("write_home", lambda: open(os.path.expanduser("~/ok"), "w").write("ok"))
print(json.dumps(r))"#
    );
    let node = exec(&client, "python", &code).await;
    let r: Value =
        serde_json::from_str(text(&node).trim()).unwrap_or_else(|e| panic!("{e}: {node}"));
    assert_eq!(r["uid"], 1000, "{r}");
    assert_eq!(r["capeff"], "0000000000000000", "{r}");
    assert_eq!(r["capbnd"], "0000000000000000", "{r}");
    assert_eq!(r["nonewprivs"], "1", "{r}");
    assert_eq!(
        r["seccomp"], "2",
        "docker's default seccomp profile is off: {r}"
    );
    for k in [
        "write_root",
        "write_agent",
        "write_etc_passwd",
        "sysrq",
        "net_connect",
        "net_dns",
        "fill_tmp_beyond_scratch",
    ] {
        assert_ne!(r[k], "allowed", "{k} was allowed: {r}");
    }
    assert_eq!(r["interfaces"], json!(["lo"]), "{r}");
    assert_ne!(r["mount"], 0, "{r}");
    assert_ne!(r["chroot"], 0, "{r}");
    assert_eq!(r["host_dir_visible"], false, "{r}");
    assert_eq!(r["docker_sock_visible"], false, "{r}");
    assert_eq!(r["write_home"], "allowed", "{r}");
    end(inst, client).await;
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn read_only_mount_is_readable_not_writable() {
    let Some(rt) = runtime("mounts").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.txt"), "from the host").unwrap();
    // the container user (1000) must be able to read it
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut s = InstanceSpec {
        session_id: "mnt".into(),
        ..Default::default()
    };
    s.mounts = vec![Mount {
        source: dir.path().to_path_buf(),
        destination: "/data".into(),
        read_only: true,
    }];
    let (inst, client) = begin(&rt, s).await.expect("begin");
    let node = exec(
        &client,
        "bash",
        "cat /data/data.txt; echo; touch /data/new 2>/dev/null && echo WROTE || echo DENIED",
    )
    .await;
    assert_eq!(text(&node), "from the host\nDENIED\n", "{node}");
    end(inst, client).await;
    assert!(!dir.path().join("new").exists());
    assert_none_left(&rt).await;
}

#[tokio::test]
async fn warm_pool_hands_out_containers_with_the_sessions_limits() {
    use sparkla_runtime::{Pool, PoolConfig};
    let Some(rt) = runtime("pool").await else {
        return;
    };
    let server = rt.config().server_id.clone();
    let client_api = rt.client().clone();
    let rt: std::sync::Arc<dyn Runtime> = std::sync::Arc::new(rt);
    let pool = Pool::new(
        rt.clone(),
        PoolConfig {
            size: 1,
            warm_languages: vec!["python".into()],
            ..Default::default()
        },
    );
    assert!(
        pool.wait_full(Duration::from_secs(60)).await,
        "pool did not fill"
    );
    let mut s = spec("pooled");
    s.limits.memory_bytes = Some(300 << 20);
    s.limits.pids = Some(99);
    let (inst, client) = pool.begin(s).await.expect("begin from pool");
    assert_eq!(inst.session_id(), "pooled");
    assert_eq!(
        outputs(&exec(&client, "python", "5*5").await),
        vec![json!(25)]
    );
    // The warm container (named after its pool id) now has this session's limits.
    let mut filters = HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("{LABEL_SERVER}={server}")],
    );
    let list = client_api
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    let mut limits = Vec::new();
    for c in list {
        // The pool's refill may be creating or removing others meanwhile: skip those.
        let Ok(info) = client_api
            .inspect_container(c.id.as_deref().unwrap(), None)
            .await
        else {
            continue;
        };
        let hc = info.host_config.unwrap();
        limits.push((hc.memory, hc.memory_swap, hc.pids_limit));
    }
    assert!(
        limits.contains(&(Some(300 << 20), Some(300 << 20), Some(99))),
        "no container with the session's limits: {limits:?}"
    );
    end(inst, client).await;
    pool.shutdown().await;
    rt.sweep().await.expect("sweep");
    let left = client_api
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

#[tokio::test]
async fn container_removed_mid_execution_fails_cleanly() {
    let Some(rt) = runtime("removed").await else {
        return;
    };
    let (mut inst, client) = begin(&rt, spec("r")).await.expect("begin");
    let client = std::sync::Arc::new(client);
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .execute(
                    "long",
                    conformance::chunk("python", "import time\ntime.sleep(60)"),
                    None,
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let name = format!("sparkla-{}-r", rt.config().server_id);
    rt.client()
        .remove_container(
            &name,
            Some(
                bollard::query_parameters::RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .build(),
            ),
        )
        .await
        .expect("docker rm -f");
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the execution did not end when its container was removed")
        .unwrap();
    assert!(
        result.is_err(),
        "execution succeeded in a removed container: {result:?}"
    );
    match inst.state().await {
        InstanceState::Exited { reason } => assert!(reason.contains("removed"), "{reason}"),
        s => panic!("removed container reported {s:?}"),
    }
    inst.stop()
        .await
        .expect("stop of a removed container is clean");
    assert_none_left(&rt).await;
}

/// `sparkla env build docker` through the library: up to date in well under a second when the
/// image of the current recipe exists, else a full build (minutes), hence ignored by default.
#[tokio::test]
#[ignore = "may build the image (about 5 min on a fresh machine); run with --ignored"]
async fn env_build_produces_the_default_image() {
    use sparkla_runtime::docker::image::{build_default_image, BuildOptions};
    let built = build_default_image(&BuildOptions::default())
        .await
        .expect("build");
    assert_eq!(built.tag, DEFAULT_IMAGE);
    assert!(built.id.starts_with("sha256:"), "{built:?}");
    let Some(rt) = runtime_with("env-build", cat()).await else {
        return;
    };
    assert_eq!(rt.image_info(None).await.expect("info").id, built.id);
}
