//! Session start-up on the Docker runtime, beside `docker run --rm` and the sandbox runtime,
//! measured in the same run.
//!
//! ```sh
//! scripts/build-docker-env.sh                       # the image, once
//! cargo build --release -p sparkla-agent           # the agent next to the bench binary
//! cargo bench -p sparkla-runtime --bench docker    # SPARKLA_BENCH_N=50 sessions per row
//! ```
//!
//! Rows: "begin→1st result" is start + agent ready + `1+1` in Python answered;
//! "begin+exec+end" adds stopping and removing the instance. "pool" rows take a warm
//! instance (python kernel started) from a [`Pool`] that is full before each session (the
//! hand-out latency when the pool keeps up). No thresholds: figures only.

use serde_json::json;
use sparkla_runtime::docker::{DockerConfig, DockerRuntime, DEFAULT_IMAGE};
use sparkla_runtime::sandbox::pool::start_ready;
use sparkla_runtime::sandbox::{SandboxConfig, SandboxRuntime};
use sparkla_runtime::{AgentClient, Instance, InstanceSpec, Pool, PoolConfig, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(60);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(run());
}

struct Row {
    name: String,
    samples: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn print_rows(rows: &[Row]) {
    println!(
        "\n{:<44} {:>4} {:>10} {:>10} {:>10}",
        "measure", "n", "p50 ms", "p99 ms", "mean ms"
    );
    for r in rows {
        if r.samples.is_empty() {
            println!("{:<44} {:>4}   (skipped)", r.name, 0);
            continue;
        }
        let mut s = r.samples.clone();
        s.sort();
        let mean = s.iter().sum::<Duration>() / s.len() as u32;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<44} {:>4} {:>10.1} {:>10.1} {:>10.1}",
            r.name,
            s.len(),
            ms(pct(&s, 50.0)),
            ms(pct(&s, 99.0)),
            ms(mean)
        );
    }
}

async fn first_result(client: &AgentClient) {
    let node = client
        .execute(
            "bench",
            json!({"type": "CodeChunk", "programmingLanguage": "python", "text": "1+1"}),
            None,
        )
        .await
        .expect("execute");
    assert_eq!(node["outputs"], json!([2]), "{node}");
}

async fn end(mut inst: Box<dyn Instance>, client: AgentClient) {
    drop(client);
    inst.stop().await.expect("stop");
}

fn spec(i: usize, prefix: &str) -> InstanceSpec {
    InstanceSpec {
        session_id: format!("{prefix}-{i}"),
        ..Default::default()
    }
}

/// Cold sessions: (begin→first result, begin+exec+end).
async fn cold(rt: &dyn Runtime, n: usize, prefix: &str) -> (Vec<Duration>, Vec<Duration>) {
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let (inst, client) = start_ready(rt, spec(i, prefix), READY)
            .await
            .expect("begin");
        first_result(&client).await;
        first.push(t0.elapsed());
        end(inst, client).await;
        total.push(t0.elapsed());
    }
    (first, total)
}

/// Sessions from a full warm pool.
async fn pooled(rt: Arc<dyn Runtime>, n: usize, prefix: &str) -> (Vec<Duration>, Vec<Duration>) {
    let pool = Pool::new(
        rt,
        PoolConfig {
            size: 2,
            warm_languages: vec!["python".into()],
            ..Default::default()
        },
    );
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for i in 0..n {
        assert!(pool.wait_full(READY).await, "pool did not fill");
        let t0 = Instant::now();
        let (inst, client) = pool.begin(spec(i, prefix)).await.expect("begin");
        first_result(&client).await;
        first.push(t0.elapsed());
        end(inst, client).await;
        total.push(t0.elapsed());
    }
    pool.shutdown().await;
    (first, total)
}

fn docker_run_baseline(n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let o = std::process::Command::new("docker")
            .args(["run", "--rm", DEFAULT_IMAGE, "python3", "-c", "print(1+1)"])
            .output()
            .expect("docker run");
        assert!(o.status.success() && o.stdout == b"2\n", "{o:?}");
        out.push(t0.elapsed());
    }
    out
}

async fn run() {
    let n: usize = std::env::var("SPARKLA_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut rows = Vec::new();
    let server_id = format!("bench-{}", std::process::id());

    let docker = match DockerRuntime::new(DockerConfig::new(&server_id)).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("\n******** SKIPPED: docker benchmark because {e} ********\n");
            return;
        }
    };
    if let Err(e) = docker.prepare(None).await {
        eprintln!("\n******** SKIPPED: docker benchmark because {e} ********\n");
        return;
    }
    println!(
        "docker runtime: image {DEFAULT_IMAGE}, agent {}, {n} sessions per row",
        docker.agent().display()
    );
    let docker: Arc<dyn Runtime> = Arc::new(docker);
    // Warm the engine's and the page cache's paths (not counted).
    cold(docker.as_ref(), 2, "warmup").await;

    let (f, t) = cold(docker.as_ref(), n, "cold").await;
    rows.push(Row {
        name: "docker: begin→1st result (cold)".into(),
        samples: f,
    });
    rows.push(Row {
        name: "docker: begin+exec+end (cold)".into(),
        samples: t,
    });
    let (f, t) = pooled(docker.clone(), n, "pooled").await;
    rows.push(Row {
        name: "docker: begin→1st result (pool)".into(),
        samples: f,
    });
    rows.push(Row {
        name: "docker: begin+exec+end (pool)".into(),
        samples: t,
    });
    let b = tokio::task::spawn_blocking(move || docker_run_baseline(n))
        .await
        .unwrap();
    rows.push(Row {
        name: "baseline: docker run --rm python3 print(1+1)".into(),
        samples: b,
    });
    docker.sweep().await.expect("sweep");

    // The sandbox runtime in the same run (needs root).
    let launcher = PathBuf::from(env!("CARGO_BIN_EXE_sparkla-sandbox"));
    let state_dir = PathBuf::from(format!("/run/sparkla-bench-{}", std::process::id()));
    let config = SandboxConfig {
        launcher: Some(launcher),
        state_dir: state_dir.clone(),
        cgroup_parent: format!("sparkla-bench-{}", std::process::id()),
        cgroup_nest: false,
        host_id_base: 3_000_000,
        ..Default::default()
    };
    match SandboxRuntime::new(config) {
        Ok(sandbox) => {
            let sandbox = Arc::new(sandbox);
            let sb: Arc<dyn Runtime> = sandbox.clone();
            cold(sb.as_ref(), 2, "sb-warmup").await;
            let (f, t) = cold(sb.as_ref(), n, "sb-cold").await;
            rows.push(Row {
                name: "sandbox: begin→1st result (cold)".into(),
                samples: f,
            });
            rows.push(Row {
                name: "sandbox: begin+exec+end (cold)".into(),
                samples: t,
            });
            let (f, t) = pooled(sb.clone(), n, "sb-pooled").await;
            rows.push(Row {
                name: "sandbox: begin→1st result (pool)".into(),
                samples: f,
            });
            rows.push(Row {
                name: "sandbox: begin+exec+end (pool)".into(),
                samples: t,
            });
            let _ = sb.sweep().await;
            // Leave no cgroup parent or state directory of this run behind.
            let _ = sandbox.cgroups().remove_parent();
            let _ = std::fs::remove_dir_all(&state_dir);
        }
        Err(e) => {
            eprintln!("\n******** SKIPPED: sandbox rows because {e} ********\n");
        }
    }
    print_rows(&rows);
}
