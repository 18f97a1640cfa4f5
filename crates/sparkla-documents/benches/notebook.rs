//! Time to execute a 20-cell notebook end to end: `sparkla execute` (the sparkla-execute
//! example: process start, sandbox session, 20 cells, atomic write) beside
//! `jupyter nbconvert --to notebook --execute` on the same notebook, alternating, in the
//! same run. Also the library call alone (no process start), with the runtime built per
//! call (what the command does) and built once (what a long-running program would do).
//!
//! Run as root (the sandbox), after `cargo build -p sparkla-agent -p sparkla-runtime` and
//! `cargo build -p sparkla-documents --example sparkla-execute`:
//!
//! ```sh
//! /usr/bin/python3 -m venv --system-site-packages /tmp/nbbench
//! /tmp/nbbench/bin/pip install nbconvert ipykernel
//! cargo bench -p sparkla-documents --bench notebook -- [ROUNDS]   # default 10 rounds
//! ```
//!
//! `JUPYTER=/path/to/jupyter` picks another nbconvert.

use serde_json::{json, Value};
use sparkla_documents::{execute, ExecuteOptions, Output, Progress, Session};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn cells() -> Vec<String> {
    let mut c = vec![
        "import math, statistics, json\nimport numpy as np\nimport pandas as pd".to_string(),
        "data = np.arange(1000, dtype=float)\nprint(data.mean())".to_string(),
    ];
    for i in 0..16 {
        c.push(match i % 4 {
            0 => format!("x{i} = sum(k * k for k in range(1000))\nx{i}"),
            1 => format!("s{i} = ' '.join(str(k) for k in range(50))\nprint(len(s{i}))"),
            2 => format!("d{i} = {{'k': {i}, 'sqrt': math.sqrt({i})}}\njson.dumps(d{i})"),
            _ => format!("float(np.std(data[:{}]))", 100 + i * 10),
        });
    }
    c.push("df = pd.DataFrame({'a': range(5), 'b': [v * 2 for v in range(5)]})\ndf".into());
    c.push("print(statistics.median([3, 1, 2]))".into());
    assert_eq!(c.len(), 20);
    c
}

fn notebook() -> Value {
    let cells: Vec<Value> = cells()
        .into_iter()
        .enumerate()
        .map(|(i, src)| {
            json!({"cell_type": "code", "id": format!("c{i}"), "metadata": {}, "source": src, "outputs": [], "execution_count": null})
        })
        .collect();
    json!({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}
        },
        "cells": cells,
    })
}

fn sibling(rel: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join(rel);
    p.is_file().then_some(p)
}

fn stats(name: &str, xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        println!("{name:<44} (no samples)");
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = xs[xs.len() / 2];
    let p99 = xs[((xs.len() as f64 * 0.99).ceil() as usize).clamp(1, xs.len()) - 1];
    println!(
        "{name:<44} median {:>7.1} ms   p99 {:>7.1} ms   min {:>7.1} ms   (n={})",
        median * 1e3,
        p99 * 1e3,
        xs[0] * 1e3,
        xs.len()
    );
    median
}

fn timed(mut cmd: Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(s)
}

fn outputs_ok(path: &Path) -> bool {
    let v: Value = match std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => v,
        None => return false,
    };
    v["cells"]
        .as_array()
        .map(|cells| {
            // Every cell but the first (imports) shows something; none failed.
            cells.iter().skip(1).all(|c| {
                c["outputs"]
                    .as_array()
                    .is_some_and(|o| !o.is_empty() && o.iter().all(|x| x["output_type"] != "error"))
            })
        })
        .unwrap_or(false)
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the notebook benchmark needs root (the sandbox runtime)");
        return;
    }
    let Some(cli) = sibling("examples/sparkla-execute") else {
        eprintln!("SKIPPED: build the example first: cargo build -p sparkla-documents --example sparkla-execute");
        return;
    };
    let jupyter = std::env::var_os("JUPYTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/nbbench/bin/jupyter"));
    let has_jupyter = jupyter.is_file();
    if !has_jupyter {
        eprintln!(
            "NOTE: no baseline: {} not found (python3 -m venv --system-site-packages /tmp/nbbench && /tmp/nbbench/bin/pip install nbconvert ipykernel)",
            jupyter.display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let nb = dir.path().join("bench.ipynb");
    std::fs::write(&nb, serde_json::to_vec_pretty(&notebook()).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A runtime built once, as a long-running program (a server, an editor) would hold it.
    let prebuilt = rt
        .block_on(sparkla_documents::executor::runtime_named("sandbox", None))
        .expect("sandbox runtime");
    let (mut cli_t, mut lib_t, mut warm_t, mut nbc_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        // Round 0 warms caches (page cache of interpreters, imports) for both; not counted.
        let out = dir.path().join("sparkla.ipynb");
        let mut cmd = Command::new(&cli);
        cmd.arg(&nb).arg("-o").arg(&out).arg("--quiet");
        let t = timed(cmd).unwrap_or_else(|e| panic!("sparkla execute failed: {e}"));
        assert!(
            outputs_ok(&out),
            "sparkla: every cell but the first has outputs, none an error"
        );
        if round > 0 {
            cli_t.push(t);
        }

        let mut opts = ExecuteOptions::new(
            &nb,
            Session::Runtime {
                name: "sandbox".into(),
                agent: None,
                environment: None,
            },
        );
        opts.output = Output::File(dir.path().join("lib.ipynb"));
        opts.progress = Progress::Never;
        let t = Instant::now();
        let report = rt.block_on(execute(opts)).expect("execute");
        let s = t.elapsed().as_secs_f64();
        assert_eq!(report.errors(), 0);
        if round > 0 {
            lib_t.push(s);
        }

        let mut opts = ExecuteOptions::new(
            &nb,
            Session::Given {
                runtime: prebuilt.clone(),
                environment: None,
            },
        );
        opts.output = Output::File(dir.path().join("warm.ipynb"));
        opts.progress = Progress::Never;
        let t = Instant::now();
        let report = rt.block_on(execute(opts)).expect("execute");
        let s = t.elapsed().as_secs_f64();
        assert_eq!(report.errors(), 0);
        if round > 0 {
            warm_t.push(s);
        }

        if has_jupyter {
            let mut cmd = Command::new(&jupyter);
            cmd.args(["nbconvert", "--to", "notebook", "--execute", "--output"])
                .arg(dir.path().join("nbconvert.ipynb"))
                .arg(&nb);
            let t = timed(cmd).unwrap_or_else(|e| panic!("nbconvert failed: {e}"));
            assert!(
                outputs_ok(&dir.path().join("nbconvert.ipynb")),
                "nbconvert: every cell but the first has outputs, none an error"
            );
            if round > 0 {
                nbc_t.push(t);
            }
        }
    }
    println!("20-cell notebook, end to end, {rounds} rounds (after 1 warm-up), alternating:");
    let a = stats("sparkla execute (sandbox, new process)", &mut cli_t);
    stats("library call, runtime built per call", &mut lib_t);
    stats("library call, runtime built once", &mut warm_t);
    if has_jupyter {
        let b = stats("jupyter nbconvert --to notebook --execute", &mut nbc_t);
        println!("nbconvert / sparkla execute (medians): {:.1}x", b / a);
    }
}
