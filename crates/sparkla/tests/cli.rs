//! The `sparkla` binary: help, configuration precedence, and `sparkla serve` end to end
//! (generated secret and admin URL, an Executa client session, SIGTERM leaving nothing).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_sparkla");

fn sparkla(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("SPARKLA_") || k == "JWT_SECRET" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run sparkla");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_shows_every_option_with_its_default_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, help, _) = sparkla(&["--help"], &[], dir.path());
    assert!(ok);
    for flag in [
        "config",
        "debug",
        "host",
        "port",
        "jwt-secret",
        "runtime",
        "cpu-total",
        "memory-total",
        "expiry-interval",
        "duration-warning",
        "timeout-warning",
        "stale-interval",
        "stale-period",
        "pool-size",
        "max-connections",
        "max-message-size",
        "session-defaults",
        "mount-allow",
        "allow-network",
        "agent",
        "start-timeout",
        "max-restarts",
        "max-starting",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("--{flag} ")))
            .unwrap_or_else(|| panic!("--{flag} missing from --help:\n{help}"));
        assert!(
            line.contains("[default:"),
            "--{flag} shows no default: {line}"
        );
        let env = format!("SPARKLA_{}", flag.to_uppercase().replace('-', "_"));
        assert!(line.contains(&env), "--{flag} shows no {env}: {line}");
    }
    for cmd in ["serve", "config", "bench"] {
        assert!(help.contains(&format!("  {cmd} ")), "command {cmd} missing");
    }
}

#[test]
fn configuration_precedence_cli_env_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".sparklarc"),
        "port = 1111\nhost = \"0.0.0.0\"\ncpuTotal = 5\nexpiryInterval = 2\n[sessionDefaults]\ncpuRequest = 0.5\n",
    )
    .unwrap();
    let config = |args: &[&str], env: &[(&str, &str)]| -> Value {
        let mut all = vec!["config"];
        all.extend_from_slice(args);
        let (ok, out, err) = sparkla(&all, env, dir.path());
        assert!(ok, "sparkla config failed: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let c = config(&[], &[]);
    assert_eq!(c["port"], 1111, "file over default");
    assert_eq!(c["host"], "0.0.0.0");
    assert_eq!(c["cpuTotal"], 5.0);
    assert_eq!(c["sessionDefaults"], json!({"cpuRequest": 0.5}));
    assert_eq!(c["timeoutWarning"], 60.0, "default kept");
    assert_eq!(c["jwtSecret"], Value::Null);
    let c = config(&[], &[("SPARKLA_PORT", "2222"), ("JWT_SECRET", "x")]);
    assert_eq!(c["port"], 2222, "env over file");
    assert_eq!(c["jwtSecret"], "(set, hidden)");
    let c = config(
        &[
            "--port",
            "3333",
            "--cpu-total",
            "7",
            "--expiry-interval",
            "0.5",
            "--mount-allow",
            "/srv/a,/srv/b",
        ],
        &[("SPARKLA_PORT", "2222"), ("SPARKLA_CPU_TOTAL", "6")],
    );
    assert_eq!(c["port"], 3333, "CLI over env");
    assert_eq!(c["cpuTotal"], 7.0);
    assert_eq!(c["expiryInterval"], 0.5);
    assert_eq!(c["mountAllow"], json!(["/srv/a", "/srv/b"]));
    assert_eq!(config(&["--docker"], &[])["runtime"], "docker");
    assert_eq!(config(&["--firecracker"], &[])["runtime"], "firecracker");
    assert_eq!(config(&["--debug"], &[])["debug"], true);

    // A JSON file via --config; unknown keys and bad values are errors, not ignored.
    let json_file = dir.path().join("c.json");
    std::fs::write(&json_file, r#"{"port": 4444, "runtime": "process"}"#).unwrap();
    let c = config(&["--config", json_file.to_str().unwrap()], &[]);
    assert_eq!(
        (c["port"].clone(), c["runtime"].clone()),
        (json!(4444), json!("process"))
    );
    std::fs::write(&json_file, r#"{"prot": 1}"#).unwrap();
    let (ok, _, err) = sparkla(
        &["config", "--config", json_file.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert!(!ok && err.contains("prot"), "{err}");
    let (ok, _, err) = sparkla(&["config", "--runtime", "bogus"], &[], dir.path());
    assert!(!ok && err.contains("runtime must be"), "{err}");
}

#[test]
fn unusable_runtime_is_refused_clearly() {
    // A firecracker binary that does not exist: the server refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = sparkla(
        &["--firecracker", "--port", "0"],
        &[("PATH", "/nonexistent")],
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("cannot use the firecracker runtime"), "{err}");
}

fn runtime() -> &'static str {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } == 0 {
        "sandbox"
    } else {
        eprintln!("NOTE: not root: `sparkla serve` is tested with --runtime process (the sandbox needs root)");
        "process"
    }
}

/// Processes below `root` (by parent links).
fn below(root: u32) -> HashSet<i32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        if let Some(ppid) = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut q = p;
            for _ in 0..64 {
                match parent.get(&q) {
                    Some(&pp) if pp == root as i32 => return true,
                    Some(&pp) => q = pp,
                    None => return false,
                }
            }
            false
        })
        .collect()
}

/// `sparkla --debug` (no subcommand) serves: generated secret, admin URL, an Executa client
/// session with python, then SIGTERM: exit 0 and no process left.
#[tokio::test(flavor = "multi_thread")]
async fn serve_with_generated_secret_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SPARKLA_") || k == "JWT_SECRET" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["--debug", "--port", "0", "--runtime", runtime()])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut admin_url = None;
    let mut addr = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while admin_url.is_none() || addr.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("sparkla logs its admin URL and address");
        let plain = strip_ansi(&line);
        if let Some(i) = plain.find("http://") {
            if plain.contains("admin URL") {
                admin_url = Some(plain[i..].trim().to_string());
            }
        }
        if plain.contains("sparkla is serving") {
            if let Some(a) = plain.split("addr=").nth(1) {
                addr = Some(a.split_whitespace().next().unwrap().to_string());
            }
        }
    }
    let admin_url = admin_url.unwrap();
    let addr = addr.unwrap();
    let token = admin_url.split("jwt=").nth(1).unwrap().to_string();
    assert!(
        admin_url.starts_with(&format!("http://{addr}/admin?jwt=")),
        "{admin_url}"
    );

    // /admin with the logged token.
    let (status, body) = get(&addr, &format!("/admin?jwt={token}")).await;
    assert_eq!(status, 200, "{body}");
    let admin: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(admin["runtime"], runtime());

    // An Executa client: subprotocol with the token.
    let mut req = format!("ws://{addr}").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("executa.stenci.la+1+oldclient+{token}")
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(resp.headers().get("Sec-WebSocket-Protocol").is_some());
    let call = |id: &'static str, method: &'static str, params: Value| {
        let msg = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string();
        (id, msg)
    };
    let (id, msg) = call("re1", "begin", json!({"node":{"type":"SoftwareSession"}}));
    ws.send(Message::Text(msg.into())).await.unwrap();
    let s = read_response(&mut ws, id).await;
    assert_eq!(s["status"], "started", "{s}");
    let (id, msg) = call(
        "re2",
        "execute",
        json!({"node":{"type":"CodeChunk","programmingLanguage":"python","text":"print('hi')\n6*7"},"session":{"type":"SoftwareSession","id":s["id"]}}),
    );
    ws.send(Message::Text(msg.into())).await.unwrap();
    let out = read_response(&mut ws, id).await;
    assert_eq!(out["outputs"], json!(["hi\n", 42]), "{out}");
    let during = below(child.id());
    assert!(!during.is_empty(), "the session runs below the server");

    // SIGTERM with the session still open: graceful shutdown.
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    for _ in 0..1000 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = status.expect("sparkla exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    // Killed processes may stay zombies of init for a moment (until init reaps them): a
    // live process, or a zombie that outlasts 5 s, is a leak.
    let mut left: Vec<String> = Vec::new();
    for _ in 0..500 {
        left = during
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left.is_empty(), "processes left after shutdown: {left:?}");
}

async fn read_response(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    id: &str,
) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("response in time")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{v}");
                return v["result"].clone();
            }
        }
    }
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
