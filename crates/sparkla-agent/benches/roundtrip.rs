//! Agent round trip for a trivial chunk in each language, beside the interpreter doing the
//! same work in-process, and kernel cold start beside the bare interpreter's start.
//!
//! Run: `cargo bench -p sparkla-agent --bench roundtrip` (env ROUNDTRIPS, default 2000;
//! COLD_STARTS, default 30).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&xs, 0.5), percentile(&xs, 0.99))
}

struct Agent {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    id: u64,
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sparkla-agent"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut a = Agent {
            child,
            stdin,
            lines,
            id: 0,
        };
        let ready: Value = serde_json::from_str(&a.lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(ready["method"], "ready");
        a
    }

    fn execute(&mut self, lang: &str, code: &str) -> Value {
        self.id += 1;
        let msg = json!({"jsonrpc":"2.0","id":self.id,"method":"execute",
            "params":{"node":{"type":"CodeChunk","programmingLanguage":lang,"text":code}}});
        writeln!(self.stdin, "{msg}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let v: Value = serde_json::from_str(&self.lines.next().unwrap().unwrap()).unwrap();
            if v["id"] == self.id {
                return v["result"].clone();
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per-iteration times (µs) of the interpreter doing the chunk's work in-process.
fn in_process(lang: &str, n: usize) -> Vec<f64> {
    let (prog, args): (&str, Vec<String>) = match lang {
        "python" => (PYTHON, vec!["-c".into(), format!(
            "import ast,time\ng={{}}\nfor i in range({n}):\n t=time.perf_counter()\n tree=ast.parse('1+1')\n v=eval(compile(ast.Expression(tree.body[0].value),'<c>','eval'),g)\n print((time.perf_counter()-t)*1e6)")]),
        "javascript" => ("node", vec!["-e".into(), format!(
            "const vm=require('vm');const out=[];for(let i=0;i<{n};i++){{const t=process.hrtime.bigint();new vm.Script('1+1').runInThisContext();out.push(Number(process.hrtime.bigint()-t)/1e3)}}console.log(out.join('\\n'))")]),
        "bash" => ("bash", vec!["-c".into(), format!(
            "for ((i=0;i<{n};i++)); do t=$EPOCHREALTIME; eval 'echo $((1+1))' >/dev/null; e=$EPOCHREALTIME; echo $(( (${{e/./}} - ${{t/./}}) )); done")]),
        _ => unreachable!(),
    };
    let out = Command::new(prog)
        .args(args)
        .output()
        .expect("run interpreter");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Wall time (ms) of a command from spawn to exit.
fn run_time(prog: &str, args: &[&str]) -> f64 {
    let t = Instant::now();
    let s = Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success());
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let n = env_usize("ROUNDTRIPS", 2000);
    let cold = env_usize("COLD_STARTS", 30);
    let chunks = [
        ("python", "1+1"),
        ("bash", "echo $((1+1))"),
        ("javascript", "1+1"),
    ];

    println!("## Agent round trip, trivial chunk, {n} sequential executions per language (warm kernel)\n");
    println!(
        "| language | round trip p50 | p99 | in-process p50 | p99 | agent overhead (p50 diff) |"
    );
    println!("|---|---|---|---|---|---|");
    for (lang, code) in chunks {
        let mut agent = Agent::start();
        let r = agent.execute(lang, code);
        assert!(r.get("errors").is_none(), "{r}");
        for _ in 0..50 {
            agent.execute(lang, code);
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            agent.execute(lang, code);
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let (p50, p99) = summary(times);
        let (i50, i99) = summary(in_process(lang, n));
        println!(
            "| {lang} | {p50:.0} µs | {p99:.0} µs | {i50:.1} µs | {i99:.1} µs | {:.0} µs |",
            p50 - i50
        );
    }

    println!("\n## Kernel cold start, {cold} runs: agent spawn → first result, beside the bare interpreter\n");
    println!("| language | agent start + kernel start + first result p50 | p99 | bare interpreter p50 | p99 | bare command |");
    println!("|---|---|---|---|---|---|");
    let bare: [(&str, &str, &[&str]); 3] = [
        ("python", PYTHON, &["-c", "pass"]),
        ("bash", "bash", &["-c", "true"]),
        ("javascript", "node", &["-e", "0"]),
    ];
    for ((lang, code), (_, prog, args)) in chunks.into_iter().zip(bare) {
        let mut starts = Vec::new();
        let mut bares = Vec::new();
        for _ in 0..cold {
            let t = Instant::now();
            let mut agent = Agent::start();
            let r = agent.execute(lang, code);
            starts.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(r.get("errors").is_none());
            drop(agent);
            bares.push(run_time(prog, args));
            std::thread::sleep(Duration::from_millis(5));
        }
        let (s50, s99) = summary(starts);
        let (b50, b99) = summary(bares);
        println!(
            "| {lang} | {s50:.1} ms | {s99:.1} ms | {b50:.1} ms | {b99:.1} ms | `{prog} {}` |",
            args.join(" ")
        );
    }
}
