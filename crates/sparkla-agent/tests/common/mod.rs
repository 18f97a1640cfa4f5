//! A test client for the agent: runs the real `sparkla-agent` binary as a separate process
//! and speaks its newline-delimited JSON-RPC over stdin/stdout.

#![allow(dead_code)]

pub mod conformance;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct AgentProc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    /// Notifications received so far (in order).
    pub notifications: Vec<Value>,
    /// Responses received while waiting for another.
    responses: Vec<Value>,
    next_id: u64,
    pub ready: Value,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    pub fn start() -> AgentProc {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> AgentProc {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_sparkla-agent")).args(args))
    }

    pub fn spawn(cmd: &mut Command) -> AgentProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = cmd
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sparkla-agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("agent wrote a line that is not JSON ({e}): {line}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut agent = AgentProc {
            child,
            stdin,
            lines,
            notifications: Vec::new(),
            responses: Vec::new(),
            next_id: 1,
            ready: Value::Null,
            _dir: dir,
        };
        let first = agent
            .lines
            .recv_timeout(TIMEOUT)
            .expect("ready notification");
        assert_eq!(
            first["method"], "ready",
            "first message is `ready`: {first}"
        );
        agent.ready = first["params"].clone();
        agent
    }

    pub fn send_raw(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write to agent");
        stdin.flush().expect("flush");
    }

    /// Send a request; returns its id.
    pub fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_raw(&format!("{msg}\n"));
        id
    }

    /// The next message that is not a notification.
    pub fn next_response(&mut self) -> Value {
        if !self.responses.is_empty() {
            return self.responses.remove(0);
        }
        loop {
            let v = self
                .lines
                .recv_timeout(TIMEOUT)
                .expect("a response from the agent");
            if v.get("method").is_some() {
                self.notifications.push(v);
            } else {
                return v;
            }
        }
    }

    /// The next message of any kind (notifications included), in arrival order.
    pub fn next_response_or_notification(&mut self) -> Value {
        if !self.responses.is_empty() {
            return self.responses.remove(0);
        }
        self.lines
            .recv_timeout(TIMEOUT)
            .expect("a message from the agent")
    }

    /// Wait for the response to request `id`.
    pub fn response(&mut self, id: u64) -> Value {
        if let Some(i) = self.responses.iter().position(|r| r["id"] == id) {
            return self.responses.remove(i);
        }
        loop {
            let v = self
                .lines
                .recv_timeout(TIMEOUT)
                .expect("a response from the agent");
            if v.get("method").is_some() {
                self.notifications.push(v);
            } else if v["id"] == id {
                return v;
            } else {
                self.responses.push(v);
            }
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params);
        self.response(id)
    }

    /// Execute a node and return the executed node (the response's result).
    pub fn execute_node(&mut self, node: Value) -> Value {
        let r = self.call("execute", json!({ "node": node }));
        assert!(r.get("error").is_none(), "execute failed: {r}");
        r["result"].clone()
    }

    pub fn execute(&mut self, language: &str, code: &str) -> Value {
        self.execute_node(
            json!({"type": "CodeChunk", "programmingLanguage": language, "text": code}),
        )
    }

    /// Execute a conformance step (with its cancel and output limit, if any).
    pub fn run_step(&mut self, language: &str, step: &Value, job: &str) -> Value {
        let node = conformance::step_node(language, step);
        let mut params = json!({ "node": node, "job": job });
        if let Some(limit) = step.get("outputLimit") {
            params["outputLimit"] = limit.clone();
        }
        let id = self.send("execute", params);
        if let Some(ms) = step["cancelAfterMs"].as_u64() {
            std::thread::sleep(Duration::from_millis(ms));
            let c = self.call("cancel", json!({ "job": job }));
            assert_eq!(c["result"], true, "cancel found the job: {c}");
        }
        let r = self.response(id);
        assert!(r.get("error").is_none(), "execute failed: {r}");
        r["result"].clone()
    }

    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Say loudly that something was skipped. Written straight to the process's stderr, past
/// libtest's output capture, so that it shows even when the test passes.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Pids of the processes whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The parent pid is the 2nd field after the parenthesised command name.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(1).and_then(|f| f.parse::<i32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}
