//! The agent's byte-stream protocol, tested from a separate process against the real
//! binary and real interpreters: framing, errors, concurrency, streaming, cancel, shutdown,
//! reaping, transports, and the static build.

mod common;

use common::{children_of, AgentProc};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

#[test]
fn malformed_messages_get_errors_and_the_agent_keeps_serving() {
    let mut a = AgentProc::start();
    a.send_raw("{not json\n");
    let r = a.next_response();
    assert_eq!(r["error"]["code"], -32700, "{r}");
    assert_eq!(r["id"], Value::Null);

    a.send_raw("{\"jsonrpc\":\"2.0\",\"id\":\"x1\"}\n");
    let r = a.next_response();
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (json!("x1"), json!(-32600)),
        "{r}"
    );

    a.send_raw("[1,2,3]\n");
    assert_eq!(a.next_response()["error"]["code"], -32600);

    let r = a.call("frobnicate", json!({}));
    assert_eq!(r["error"]["code"], -32601);
    assert_eq!(r["error"]["message"], "Method not found: \"frobnicate\"");

    let r = a.call("execute", json!({}));
    assert_eq!(r["error"]["code"], -32602);
    assert_eq!(r["error"]["message"], "Invalid params: \"node\" is missing");

    let r = a.call("cancel", json!({"nope": 1}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // Still serving.
    let r = a.execute("python", "40 + 2");
    assert_eq!(r["outputs"], json!([42]));
}

#[test]
fn ids_are_echoed_as_sent() {
    let mut a = AgentProc::start();
    a.send_raw("{\"jsonrpc\":\"2.0\",\"id\":\"str-id\",\"method\":\"status\"}\n");
    assert_eq!(a.next_response()["id"], "str-id");
    a.send_raw("{\"jsonrpc\":\"2.0\",\"id\":987654321,\"method\":\"status\"}\n");
    assert_eq!(a.next_response()["id"], 987654321);
}

#[test]
fn other_nodes_come_back_unchanged() {
    let mut a = AgentProc::start();
    let node = json!({"type": "Paragraph", "content": ["hi"], "extra": {"k": 1}});
    assert_eq!(a.execute_node(node.clone()), node);
}

#[test]
fn unknown_properties_of_a_chunk_are_kept() {
    let mut a = AgentProc::start();
    let node = json!({"type": "CodeChunk", "programmingLanguage": "py", "text": "1",
                      "id": "chunk-7", "label": "L", "meta": {"a": [1]}, "outputs": ["stale"]});
    let r = a.execute_node(node);
    assert_eq!(r["id"], "chunk-7");
    assert_eq!(r["label"], "L");
    assert_eq!(r["meta"], json!({"a": [1]}));
    assert_eq!(r["outputs"], json!([1]), "old outputs are replaced");
}

#[test]
fn an_oversized_message_is_refused_and_the_agent_keeps_serving() {
    let mut a = AgentProc::start_with(&["--max-message", "1000"]);
    let big = "x".repeat(5000);
    a.send_raw(&format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"execute\",\"params\":{{\"node\":{{\"type\":\"CodeChunk\",\"text\":\"{big}\"}}}}}}\n"
    ));
    let r = a.next_response();
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exceeds the limit of 1000 bytes"));
    assert_eq!(a.execute("bash", "echo ok")["outputs"], json!(["ok\n"]));
}

#[test]
fn cancelling_an_unknown_job_says_false() {
    let mut a = AgentProc::start();
    assert_eq!(a.call("cancel", json!({"job": "never"}))["result"], false);
}

#[test]
fn a_job_id_cannot_be_used_twice_at_once() {
    let mut a = AgentProc::start();
    let first = a.send(
        "execute",
        json!({"job": "same", "node": {"type": "CodeChunk", "programmingLanguage": "bash", "text": "sleep 1"}}),
    );
    let second = a.send(
        "execute",
        json!({"job": "same", "node": {"type": "CodeChunk", "programmingLanguage": "bash", "text": "echo 2"}}),
    );
    let r2 = a.response(second);
    assert_eq!(r2["error"]["code"], -32602, "{r2}");
    assert!(a.response(first).get("result").is_some());
}

#[test]
fn languages_run_concurrently_and_each_queues_in_order() {
    let mut a = AgentProc::start();
    // Warm both kernels so that start-up time does not decide the order.
    let w = a.call("warmup", json!({"languages": ["python", "bash"]}));
    assert_eq!(w["result"], json!({"python": null, "bash": null}), "{w}");
    let slow = a.send(
        "execute",
        json!({"node": {"type": "CodeChunk", "programmingLanguage": "python", "text": "import time\ntime.sleep(1.5)\n'slow'"}}),
    );
    let queued = a.send(
        "execute",
        json!({"node": {"type": "CodeChunk", "programmingLanguage": "python", "text": "'queued'"}}),
    );
    let fast = a.send(
        "execute",
        json!({"node": {"type": "CodeChunk", "programmingLanguage": "bash", "text": "echo fast"}}),
    );
    let first = a.next_response();
    assert_eq!(first["id"], fast, "bash did not wait for python: {first}");
    let second = a.next_response();
    assert_eq!(second["id"], slow, "{second}");
    let third = a.next_response();
    assert_eq!(third["id"], queued, "{third}");
    assert_eq!(third["result"]["outputs"], json!(["queued"]));
}

#[test]
fn output_is_streamed_while_a_chunk_runs() {
    let mut a = AgentProc::start();
    let id = a.send(
        "execute",
        json!({"job": "stream", "node": {"type": "CodeChunk", "programmingLanguage": "python",
               "text": "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.3)\n'end'"}}),
    );
    // The first tick arrives long before the result.
    let start = Instant::now();
    let mut first_tick = None;
    let result = loop {
        let r = a.next_response_or_notification();
        if r["method"] == "output" && first_tick.is_none() {
            assert_eq!(r["params"]["job"], "stream");
            first_tick = Some(start.elapsed());
        }
        if r.get("id") == Some(&json!(id)) {
            break (r, start.elapsed());
        }
    };
    let first_tick = first_tick.expect("an output notification before the result");
    assert!(
        result.1 > first_tick + Duration::from_millis(400),
        "output was not streamed: first tick at {first_tick:?}, result at {:?}",
        result.1
    );
    assert_eq!(
        result.0["result"]["outputs"],
        json!(["tick 0\ntick 1\ntick 2\n", "end"])
    );
}

#[test]
fn status_and_warmup_report_kernels() {
    let mut a = AgentProc::start();
    let s = a.call("status", json!({}))["result"].clone();
    assert_eq!(s["kernels"], json!([]), "no kernel before first use: {s}");
    assert!(s["languages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "python"));
    let w = a.call("warmup", json!({"languages": ["python", "cobol"]}))["result"].clone();
    assert_eq!(w["python"], Value::Null);
    assert!(w["cobol"].as_str().unwrap().contains("cobol"));
    let s = a.call("status", json!({}))["result"].clone();
    let kernels = s["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 1, "{s}");
    assert!(alive(kernels[0]["pid"].as_i64().unwrap() as i32));
}

#[test]
fn shutdown_stops_kernels_and_exits() {
    let mut a = AgentProc::start();
    a.execute("python", "1");
    a.execute("bash", "sleep 300 &");
    let kernels: Vec<i32> = children_of(a.pid());
    assert!(kernels.len() >= 2, "kernels running: {kernels:?}");
    let r = a.call("shutdown", json!({}));
    assert_eq!(r["result"], true);
    let status = a.child.wait().expect("agent exits");
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));
    for pid in kernels {
        assert!(!alive(pid), "kernel {pid} outlived the agent");
    }
}

#[test]
fn end_of_input_finishes_running_jobs_then_exits() {
    let mut a = AgentProc::start();
    let id = a.send(
        "execute",
        json!({"node": {"type": "CodeChunk", "programmingLanguage": "python", "text": "import time\ntime.sleep(0.5)\n'finished'"}}),
    );
    a.close_stdin();
    let r = a.response(id);
    assert_eq!(r["result"]["outputs"], json!(["finished"]));
    assert!(a.child.wait().unwrap().success());
}

#[test]
fn a_vanished_host_does_not_keep_a_busy_kernel_alive() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sparkla-agent"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("\"ready\""), "{line}");
    let busy = json!({"jsonrpc":"2.0","id":1,"method":"execute","params":{"node":
        {"type":"CodeChunk","programmingLanguage":"python","text":"while True: pass"}}});
    writeln!(stdin, "{busy}").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let kernels = loop {
        let k = children_of(child.id() as i32);
        if !k.is_empty() {
            break k;
        }
        assert!(Instant::now() < deadline, "no kernel started");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    // The host goes away: both of its pipe ends close.
    drop(stdin);
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent kept running for its busy kernel"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    for pid in kernels {
        assert!(!alive(pid), "kernel {pid} outlived the agent");
    }
}

#[test]
fn orphans_are_reaped() {
    let mut a = AgentProc::start();
    // A double fork orphans `sleep`, which is re-parented to the agent (a subreaper).
    a.execute("bash", "(sleep 0.2 &)");
    let agent = a.pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zombies: Vec<i32> = children_of(agent)
            .into_iter()
            .filter(|p| !alive(*p))
            .collect();
        let sleeping = children_of(agent).into_iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "sleep")
                .unwrap_or(false)
        });
        if zombies.is_empty() && !sleeping {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphans left unreaped: {zombies:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_static_binary_runs_from_an_empty_directory() {
    let bin = env!("CARGO_BIN_EXE_sparkla-agent");
    let elf = std::fs::read(bin).unwrap();
    assert!(
        !has_interpreter(&elf),
        "sparkla-agent is dynamically linked (has PT_INTERP)"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sparkla-agent");
    std::fs::copy(bin, &copy).unwrap();
    // Run from an empty environment, in an empty directory.
    let out = std::process::Command::new(&copy)
        .arg("--version")
        .env_clear()
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sparkla-agent "));
    // And from a root that holds nothing else at all, which only a static binary survives.
    if unsafe_is_root() {
        let chroot = ["/usr/sbin/chroot", "/sbin/chroot", "/usr/bin/chroot"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chroot(8) is installed");
        let out = std::process::Command::new(chroot)
            .arg(dir.path())
            .arg("/sparkla-agent")
            .arg("--version")
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    } else {
        common::skipped("the chroot part of the static-binary test needs root");
    }
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn unix_socket_transport_keeps_kernels_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sparkla-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let exchange = |requests: &[Value]| -> Vec<Value> {
        let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream).lines();
        let ready: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(ready["method"], "ready");
        let mut out = Vec::new();
        for r in requests {
            writeln!(w, "{r}").unwrap();
            loop {
                let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
                if v.get("id").is_some() {
                    out.push(v);
                    break;
                }
            }
        }
        out
    };
    let chunk = |code: &str| json!({"jsonrpc":"2.0","id":1,"method":"execute","params":{"node":{"type":"CodeChunk","programmingLanguage":"python","text":code}}});
    let r = exchange(&[chunk("kept = 'across connections'")]);
    assert!(r[0].get("result").is_some());
    let r = exchange(&[chunk("kept")]);
    assert_eq!(r[0]["result"]["outputs"], json!(["across connections"]));
    let r = exchange(&[json!({"jsonrpc":"2.0","id":2,"method":"shutdown"})]);
    assert_eq!(r[0]["result"], true);
    assert!(child.wait().unwrap().success());
}
