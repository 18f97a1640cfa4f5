//! `sparkla bench`: N concurrent WebSocket clients, each `begin` → `execute` × E → `end`,
//! against a running server; or, with `--idle`, N idle authenticated connections held open.
//!
//! Prints the baseline (a `manifest` round trip on the same sockets, no session), begin,
//! execute and end latencies (median and p99), sessions per second, errors, and the
//! server's peak resident memory (from its `/metrics`).

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sparkla_server::edge::jwt::{self, Jwt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server address (HTTP and WebSocket)
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub addr: String,
    /// Concurrent clients (each: begin, executes, end)
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Executes per session
    #[arg(long, default_value_t = 10)]
    pub executes: usize,
    /// Language of the executed code
    #[arg(long, default_value = "python")]
    pub language: String,
    /// Code executed
    #[arg(long, default_value = "x = 6 * 7\nx")]
    pub code: String,
    /// cpuRequest of each session (cores; the sandbox enforces it as a CPU quota)
    #[arg(long, default_value_t = 1.0)]
    pub cpu_request: f64,
    /// memoryRequest of each session (GiB; enforced as the memory limit)
    #[arg(long, default_value_t = 0.1)]
    pub memory_request: f64,
    /// A token to use (else one is signed with the JWT secret given by --jwt-secret/JWT_SECRET)
    #[arg(long, env = "SPARKLA_BENCH_TOKEN")]
    pub token: Option<String>,
    /// Instead of sessions: open this many idle connections and hold them
    #[arg(long)]
    pub idle: Option<usize>,
    /// Seconds to hold idle connections before checking them
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Conn {
    ws: Ws,
    next: u64,
}

impl Conn {
    async fn open(addr: &str, token: &str, client: usize) -> anyhow::Result<Conn> {
        let mut req = format!("ws://{addr}/").into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("executa.stenci.la+1+bench{client}+{token}").parse()?,
        );
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Conn { ws, next: 1 })
    }

    /// One request; notifications before the response are skipped.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next;
        self.next += 1;
        let msg = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params});
        self.ws.send(Message::Text(msg.to_string().into())).await?;
        loop {
            let m = self.ws.next().await.context("connection closed")??;
            let text = match m {
                Message::Text(t) => t.to_string(),
                Message::Close(f) => anyhow::bail!("closed by server: {f:?}"),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text)?;
            if v.get("id") == Some(&json!(id)) {
                if let Some(e) = v.get("error") {
                    anyhow::bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }
}

#[derive(Default)]
struct Sample {
    baseline: Vec<f64>,
    begin: Vec<f64>,
    execute: Vec<f64>,
    end: Vec<f64>,
    errors: Vec<String>,
    sessions: usize,
}

async fn one_client(args: Arc<BenchArgs>, token: Arc<String>, i: usize) -> Sample {
    let mut s = Sample::default();
    let r: anyhow::Result<()> = async {
        let mut c = Conn::open(&args.addr, &token, i).await?;
        for _ in 0..3 {
            let t = Instant::now();
            c.call("manifest", json!({})).await?;
            s.baseline.push(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let session = c
            .call(
                "begin",
                json!({"node":{"type":"SoftwareSession","cpuRequest":args.cpu_request,"memoryRequest":args.memory_request}}),
            )
            .await?;
        s.begin.push(t.elapsed().as_secs_f64());
        if session["status"] != "started" {
            anyhow::bail!("begin: session {}: {}", session["status"], session["description"]);
        }
        for _ in 0..args.executes {
            let t = Instant::now();
            let out = c
                .call(
                    "execute",
                    json!({"node":{"type":"CodeChunk","programmingLanguage":args.language,"text":args.code},"session":session}),
                )
                .await?;
            s.execute.push(t.elapsed().as_secs_f64());
            if let Some(errors) = out.get("errors").and_then(Value::as_array) {
                if !errors.is_empty() {
                    s.errors.push(format!("execute: {}", errors[0]));
                }
            }
        }
        let t = Instant::now();
        let ended = c.call("end", json!({"node": session})).await?;
        s.end.push(t.elapsed().as_secs_f64());
        if ended["status"] != "stopped" {
            anyhow::bail!("end: status {}", ended["status"]);
        }
        s.sessions += 1;
        let _ = c.ws.close(None).await;
        Ok(())
    }
    .await;
    if let Err(e) = r {
        s.errors.push(format!("{e:#}"));
    }
    s
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(v: &mut [f64]) -> String {
    format!(
        "p50 {:8.2} ms   p99 {:8.2} ms   (n={})",
        pct(v, 0.5) * 1e3,
        pct(v, 0.99) * 1e3,
        v.len()
    )
}

/// The server's peak RSS from its /metrics.
async fn server_peak_rss(addr: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with("sparkla_process_peak_resident_bytes"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

fn token(args: &BenchArgs, opts: &crate::options::Options) -> anyhow::Result<String> {
    if let Some(t) = &args.token {
        return Ok(t.clone());
    }
    let secret = opts
        .jwt_secret
        .clone()
        .or_else(|| std::env::var("JWT_SECRET").ok())
        .context("give --token, or the server's secret with --jwt-secret / JWT_SECRET")?;
    Ok(Jwt::new(&secret)
        .map_err(|e| anyhow::anyhow!(e))?
        .sign(&json!({"exp": jwt::now() + 3600})))
}

pub async fn run(args: BenchArgs, opts: &crate::options::Options) -> anyhow::Result<()> {
    let token = Arc::new(token(&args, opts)?);
    let deadline = Duration::from_secs_f64(args.timeout);
    if let Some(n) = args.idle {
        return tokio::time::timeout(deadline, idle(args.clone(), token, n))
            .await
            .context("timed out")?;
    }
    let args = Arc::new(args);
    println!(
        "sparkla bench: {} clients x (begin, {} x execute {:?} in {}, end) against {}",
        args.clients, args.executes, args.code, args.language, args.addr
    );
    let rss_before = server_peak_rss(&args.addr).await;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        set.spawn(one_client(args.clone(), token.clone(), i));
    }
    let mut all = Sample::default();
    let collect = async {
        while let Some(r) = set.join_next().await {
            match r {
                Ok(s) => {
                    all.baseline.extend(s.baseline);
                    all.begin.extend(s.begin);
                    all.execute.extend(s.execute);
                    all.end.extend(s.end);
                    all.errors.extend(s.errors);
                    all.sessions += s.sessions;
                }
                Err(e) => all.errors.push(format!("client task: {e}")),
            }
        }
    };
    if tokio::time::timeout(deadline, collect).await.is_err() {
        all.errors.push(format!("timed out after {:?}", deadline));
    }
    let wall = t0.elapsed().as_secs_f64();
    let peak = server_peak_rss(&args.addr).await;
    println!("wall time          {wall:.2} s");
    println!(
        "sessions           {} completed, {:.1} sessions/s",
        all.sessions,
        all.sessions as f64 / wall
    );
    println!("baseline manifest  {}", ms(&mut all.baseline));
    println!("begin              {}", ms(&mut all.begin));
    println!("execute            {}", ms(&mut all.execute));
    println!("end                {}", ms(&mut all.end));
    println!("errors             {}", all.errors.len());
    for e in all.errors.iter().take(5) {
        println!("  {e}");
    }
    match (rss_before, peak) {
        (Some(b), Some(p)) => println!(
            "server peak RSS    {:.1} MiB (before the run: {:.1} MiB)",
            p / 1048576.0,
            b / 1048576.0
        ),
        _ => println!("server peak RSS    unknown (/metrics unreadable)"),
    }
    if !all.errors.is_empty() {
        anyhow::bail!("{} errors", all.errors.len());
    }
    Ok(())
}

async fn idle(args: BenchArgs, token: Arc<String>, n: usize) -> anyhow::Result<()> {
    println!(
        "sparkla bench --idle: opening {n} connections to {}",
        args.addr
    );
    let rss_before = server_peak_rss(&args.addr).await;
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    // Open in batches so the accept queue is not flooded.
    for batch in (0..n).collect::<Vec<_>>().chunks(200) {
        let opened = futures_util::future::join_all(
            batch.iter().map(|&i| Conn::open(&args.addr, &token, i)),
        )
        .await;
        for c in opened {
            match c {
                Ok(c) => conns.push(c),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
    }
    println!(
        "opened {} in {:.2} s ({failed} failed{})",
        conns.len(),
        t0.elapsed().as_secs_f64(),
        first_error.map(|e| format!(": {e}")).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    // Every held connection must still answer.
    let mut alive = 0usize;
    let mut results = Vec::new();
    for chunk in conns.chunks_mut(500) {
        let r =
            futures_util::future::join_all(chunk.iter_mut().map(|c| c.call("manifest", json!({}))))
                .await;
        results.extend(r.into_iter().map(|r| r.is_ok()));
    }
    alive += results.iter().filter(|ok| **ok).count();
    let peak = server_peak_rss(&args.addr).await;
    println!("alive after {:.0} s hold: {alive} of {n}", args.hold);
    if let (Some(b), Some(p)) = (rss_before, peak) {
        println!(
            "server peak RSS    {:.1} MiB (before: {:.1} MiB; {:.1} KiB per connection)",
            p / 1048576.0,
            b / 1048576.0,
            (p - b) / 1024.0 / n.max(1) as f64
        );
    }
    for c in conns.iter_mut() {
        let _ = c.ws.close(None).await;
    }
    if alive != n {
        anyhow::bail!("{} of {n} connections were lost", n - alive);
    }
    Ok(())
}
