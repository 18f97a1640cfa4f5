//! Benchmark of the sandbox runtime against bare python3 and bubblewrap, in the same run.
//!
//! ```text
//! sudo cargo bench -p sparkla-runtime --bench sandbox          # N=200 sessions per case
//! SPARKLA_BENCH_N=500 SPARKLA_BENCH_DENSITY=300 cargo bench -p sparkla-runtime --bench sandbox
//! ```
//!
//! Needs root and a built agent (`cargo build --release -p sparkla-agent`; the bench finds
//! it next to itself, or set SPARKLA_AGENT). Prints p50/p99 per case, then density.

use serde_json::json;
use sparkla_runtime::sandbox::pool::start_ready;
use sparkla_runtime::sandbox::{sibling_binary, SandboxConfig, SandboxRuntime};
use sparkla_runtime::{InstanceSpec, Pool, PoolConfig, Runtime};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";
const READY: Duration = Duration::from_secs(60);

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn row(name: &str, mut ms: Vec<f64>) {
    let n = ms.len();
    let p50 = pct(&mut ms, 0.5);
    let p99 = pct(&mut ms, 0.99);
    let mean = ms.iter().sum::<f64>() / n as f64;
    println!("| {name:<52} | {n:>4} | {p50:>8.2} | {p99:>8.2} | {mean:>8.2} |");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.stdout(Stdio::piped()).output().expect("spawn");
    let d = t.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn bwrap() -> Command {
    let mut c = Command::new("bwrap");
    c.args([
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
    ]);
    for l in ["bin", "lib", "lib64", "sbin"] {
        if let Ok(t) = std::fs::read_link(format!("/{l}")) {
            c.args(["--symlink", t.to_str().unwrap(), &format!("/{l}")]);
        }
    }
    c.args([
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        PY,
        "-c",
        "print(1+1)",
    ]);
    c
}

fn spec(id: String) -> InstanceSpec {
    InstanceSpec {
        session_id: id,
        ..Default::default()
    }
}

fn python(code: &str) -> serde_json::Value {
    json!({"type": "CodeChunk", "programmingLanguage": "python", "text": code})
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the sandbox benchmark needs root");
        return;
    }
    let Some(agent) = std::env::var_os("SPARKLA_AGENT")
        .map(PathBuf::from)
        .or_else(|| sibling_binary("sparkla-agent"))
    else {
        eprintln!("SKIPPED: sparkla-agent not built (cargo build --release -p sparkla-agent)");
        return;
    };
    let launcher =
        sibling_binary("sparkla-sandbox").expect("sparkla-sandbox built beside the bench");
    let n: usize = std::env::var("SPARKLA_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let density_max: usize = std::env::var("SPARKLA_BENCH_DENSITY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let rt = Arc::new(
        SandboxRuntime::new(SandboxConfig {
            launcher: Some(launcher.clone()),
            agent: Some(agent.clone()),
            cgroup_parent: "sparkla-bench".into(),
            cgroup_nest: false,
            state_dir: "/run/sparkla-bench".into(),
            ..Default::default()
        })
        .expect("sandbox runtime"),
    );
    rt.sweep().await.expect("sweep");
    println!(
        "sandbox benchmark: {n} sequential sessions per case; agent {}; launcher {}",
        agent.display(),
        launcher.display()
    );
    println!("| case | n | p50 ms | p99 ms | mean ms |\n|---|---|---|---|---|");

    // Baselines, measured in this run.
    let mut bare = Vec::new();
    for _ in 0..n {
        bare.push(ms(run(Command::new(PY).args(["-c", "print(1+1)"]))));
    }
    row("bare python3 -c 'print(1+1)'", bare);
    if Command::new("bwrap").arg("--version").output().is_ok() {
        let mut bw = Vec::new();
        for _ in 0..n {
            bw.push(ms(run(&mut bwrap())));
        }
        row("bwrap --unshare-all ... python3 -c 'print(1+1)'", bw);
    } else {
        println!("| bwrap: not installed | | | | |");
    }

    // Cold sessions: launcher + namespaces + agent + python kernel started on first use.
    let (mut ready, mut first, mut whole, mut end) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let t = Instant::now();
        let (mut inst, client) = start_ready(rt.as_ref(), spec(format!("bench-cold-{i}")), READY)
            .await
            .expect("begin");
        ready.push(ms(t.elapsed()));
        let node = client
            .execute("j", python("1+1"), None)
            .await
            .expect("execute");
        assert_eq!(node["outputs"], json!([2]), "{node}");
        first.push(ms(t.elapsed()));
        let te = Instant::now();
        inst.stop().await.expect("stop");
        end.push(ms(te.elapsed()));
        whole.push(ms(t.elapsed()));
    }
    row("cold: begin -> agent ready", ready);
    row("cold: begin -> first python result (1+1)", first);
    row("cold: end (stop, reclaim)", end);
    row("cold: begin + execute 1+1 + end", whole);

    // Pooled sessions: python kernel warm. Timed while the pool is not exhausted (the
    // refill between sessions is not timed; its rate is the cold rate above). Measured with
    // the refill starting at once (competing with the session for CPU) and deferred.
    for (label, delay) in [("pooled", 0u64), ("pooled, refill deferred 200 ms", 200)] {
        let pool = Pool::new(
            rt.clone(),
            PoolConfig {
                size: 2,
                refill_delay: Duration::from_millis(delay),
                ..Default::default()
            },
        );
        let (mut ready, mut first, mut end, mut whole) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            assert!(
                pool.wait_full(Duration::from_secs(60)).await,
                "pool did not fill"
            );
            let t = Instant::now();
            let (mut inst, client) = pool
                .begin(spec(format!("bench-pool-{delay}-{i}")))
                .await
                .expect("begin");
            ready.push(ms(t.elapsed()));
            let node = client
                .execute("j", python("1+1"), None)
                .await
                .expect("execute");
            assert_eq!(node["outputs"], json!([2]), "{node}");
            first.push(ms(t.elapsed()));
            let te = Instant::now();
            inst.stop().await.expect("stop");
            end.push(ms(te.elapsed()));
            whole.push(ms(t.elapsed()));
        }
        row(&format!("{label}: begin -> agent ready"), ready);
        row(&format!("{label}: begin -> first python result"), first);
        row(&format!("{label}: end (stop, reclaim)"), end);
        row(&format!("{label}: begin + execute 1+1 + end"), whole);
        pool.shutdown().await;
    }

    // Density: idle sessions with a live python kernel.
    let avail0 = mem_available_kib();
    let mut sessions = Vec::new();
    let t = Instant::now();
    while sessions.len() < density_max {
        // Keep a safety margin of host memory.
        if mem_available_kib() < 4 << 20 {
            break;
        }
        let (inst, client) = start_ready(
            rt.as_ref(),
            spec(format!("bench-density-{}", sessions.len())),
            READY,
        )
        .await
        .expect("begin");
        let node = client
            .execute("j", python("x = 1"), None)
            .await
            .expect("execute");
        assert!(node.get("errors").is_none(), "{node}");
        sessions.push((inst, client));
    }
    let started = t.elapsed();
    let count = sessions.len();
    let avail1 = mem_available_kib();
    let mut pss_total = 0u64;
    let mut cg_total = 0u64;
    for name in rt.cgroups().children() {
        if !name.starts_with("bench-density-") {
            continue;
        }
        let cg = rt.cgroups().open(&name);
        for pid in cg.pids() {
            pss_total += pss_kib(pid);
        }
        cg_total += cg.memory_current().unwrap_or(0) / 1024;
    }
    let pss_mib = pss_total as f64 / count as f64 / 1024.0;
    let cg_mib = cg_total as f64 / count as f64 / 1024.0;
    let avail_mib = (avail0.saturating_sub(avail1)) as f64 / count as f64 / 1024.0;
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!(
        "\ndensity: {count} idle sessions with a live python kernel started in {:.1} s (bound: {density_max} sessions, 4 GiB free)",
        started.as_secs_f64()
    );
    println!(
        "  per session: PSS {pss_mib:.1} MiB (all processes, smaps_rollup); cgroup memory {cg_mib:.1} MiB; MemAvailable drop {avail_mib:.1} MiB"
    );
    println!(
        "  => about {} such sessions fit in this machine's {:.1} GiB (by PSS), {} by MemAvailable drop",
        (total_kib as f64 / 1024.0 / pss_mib) as u64,
        total_kib as f64 / 1024.0 / 1024.0,
        (avail0 as f64 / 1024.0 / avail_mib.max(0.1)) as u64,
    );
    let t = Instant::now();
    for (mut inst, _client) in sessions {
        inst.stop().await.expect("stop");
    }
    println!(
        "  stopping {count} sessions took {:.1} ms ({:.2} ms each)",
        ms(t.elapsed()),
        ms(t.elapsed()) / count as f64
    );
    let report = rt.sweep().await.expect("sweep");
    assert_eq!(report.cgroups, 0, "sessions left behind: {report:?}");
    let _ = rt.cgroups().remove_parent();
    let _ = std::fs::remove_dir_all("/run/sparkla-bench");
}
