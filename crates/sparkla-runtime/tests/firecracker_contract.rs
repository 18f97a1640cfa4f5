//! Contract tests of the Firecracker runtime (Firecracker cannot run on this machine).
//!
//! * A **Firecracker double**: this test binary re-executed (test `fc_double_main`, ignored in
//!   normal runs) through a wrapper script given to the runtime as its `firecracker` binary.
//!   It serves HTTP/1.1 on `--api-sock`, validates **every request** against Firecracker's
//!   OpenAPI spec (`tests/data/firecracker-api.yaml`, a copy of
//!   `shared/reference/firecracker-api.yaml`): method, path, body schema (type, required,
//!   properties, enum, minimum/maximum, items, additionalProperties, `$ref` to definitions;
//!   unknown fields are refused, as Firecracker's `deny_unknown_fields` does). It answers as
//!   the spec documents (204, or 400 with `{"fault_message": ...}`, validating its own answers
//!   against the spec's response schemas too), keeps Firecracker's pre-boot/running/paused
//!   rules, and injects faults on request. On `InstanceStart` (or a resumed snapshot load) it
//!   "boots" the guest: a real `sparkla-agent --listen unix:...` (the same one-connection-at-
//!   a-time server the guest runs on vsock), and serves the hybrid vsock `uds_path`: expects
//!   `CONNECT <port>\n`, answers `OK <n>\n` and proxies to the agent.
//! * The runtime is then exercised end to end against the double: cold boot, begin, execute
//!   python and bash, end, nothing left; faults surfaced clearly; snapshot, restore.
//! * The hybrid-vsock handshake of [`sparkla_runtime::vm::vsock`] against a double of the vsock
//!   socket alone, proxying to a real agent over stdio, and its failure modes.
//!
//! What this does not prove: that a real Firecracker boots the guest (see tests/vm_firecracker.rs,
//! which runs the conformance suite where /dev/kvm works and firecracker is installed).

mod common;

/// Say loudly that something was skipped: straight to the process's stderr, past libtest's
/// output capture, so that it shows even when the test passes.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

use serde_json::{json, Value};
use sparkla_runtime::vm::firecracker::api::{ApiClient, ApiError};
use sparkla_runtime::vm::firecracker::{FirecrackerConfig, FirecrackerRuntime};
use sparkla_runtime::vm::{vsock, VmShape};
use sparkla_runtime::{AgentClient, Limits, Runtime, RuntimeError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

// ---------------------------------------------------------------------------------------
// The spec and a validator for the subset of OpenAPI 2.0 / JSON Schema it uses.

const SPEC_YAML: &str = include_str!("data/firecracker-api.yaml");

struct Spec {
    root: Value,
}

impl Spec {
    fn load() -> Spec {
        let root: Value = serde_norway::from_str(SPEC_YAML).expect("the spec parses");
        Spec { root }
    }

    /// The operation for `method path`, matching templated paths (`/drives/{drive_id}`).
    fn operation(&self, method: &str, path: &str) -> Result<(String, &Value), String> {
        let paths = self.root["paths"].as_object().expect("paths");
        for (template, ops) in paths {
            let t: Vec<&str> = template.split('/').collect();
            let p: Vec<&str> = path.split('/').collect();
            let matches = t.len() == p.len()
                && t.iter().zip(&p).all(|(t, p)| {
                    (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p
                });
            if matches {
                return match ops.get(method.to_ascii_lowercase()) {
                    Some(op) => Ok((template.clone(), op)),
                    None => Err(format!("{method} is not an operation of {template}")),
                };
            }
        }
        Err(format!("no path {path} in the spec"))
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/definitions/");
                self.resolve(&self.root["definitions"][name])
            }
            None => schema,
        }
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(t) = schema.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "array" => v.is_array(),
                _ => true,
            };
            if !ok {
                errs.push(format!("{at}: expected {t}, got {v}"));
                return;
            }
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array) {
            // YAML enums may be unquoted scalars (2M); compare as strings too
            let s = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            if !e.iter().any(|x| x == v || x.as_str() == Some(&s)) {
                errs.push(format!("{at}: {v} is not one of {e:?}"));
            }
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    errs.push(format!("{at}: {n} < minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    errs.push(format!("{at}: {n} > maximum {max}"));
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
            for (i, x) in arr.iter().enumerate() {
                self.validate(items, x, &format!("{at}[{i}]"), errs);
            }
        }
        if let Some(obj) = v.as_object() {
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap_or_default();
                if !obj.contains_key(r) {
                    errs.push(format!("{at}: required property {r:?} missing"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, x) in obj {
                match (props.and_then(|p| p.get(k)), additional) {
                    (Some(s), _) => self.validate(s, x, &format!("{at}.{k}"), errs),
                    (None, Some(s)) if s.is_object() => {
                        self.validate(s, x, &format!("{at}.{k}"), errs)
                    }
                    (None, _) if props.is_some() => errs.push(format!(
                        "{at}: unknown property {k:?} (Firecracker refuses unknown fields)"
                    )),
                    _ => {}
                }
            }
        }
    }

    /// Validate a request: the operation exists; a required body is there and matches its
    /// schema; a body where none is documented is refused.
    fn validate_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, Vec<String>> {
        let (template, op) = self.operation(method, path).map_err(|e| vec![e])?;
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let body_param = params.iter().find(|p| p["in"] == "body");
        let mut errs = Vec::new();
        for p in params.iter().filter(|p| p["in"] == "path") {
            let name = p["name"].as_str().unwrap_or_default();
            if !template.contains(&format!("{{{name}}}")) {
                errs.push(format!("path parameter {name} is not in {template}"));
            }
        }
        match (body_param, body) {
            (Some(p), Some(b)) => self.validate(&p["schema"], b, "body", &mut errs),
            (Some(p), None) if p["required"] == true => {
                errs.push(format!("{method} {template} needs a body"))
            }
            (None, Some(b)) => errs.push(format!("{method} {template} takes no body, got {b}")),
            _ => {}
        }
        if errs.is_empty() {
            Ok(template)
        } else {
            Err(errs)
        }
    }

    /// Whether the spec documents this answer (status, and body schema if any).
    fn validate_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let (_, op) = self.operation(method, path)?;
        let responses = &op["responses"];
        let r = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .ok_or_else(|| format!("status {status} undocumented for {method} {path}"))?;
        if let (Some(schema), Some(b)) = (r.get("schema"), body) {
            let mut errs = Vec::new();
            self.validate(schema, b, "response", &mut errs);
            if !errs.is_empty() {
                return Err(errs.join("; "));
            }
        }
        Ok(())
    }
}

#[test]
fn the_validator_catches_what_firecracker_would_refuse() {
    let spec = Spec::load();
    let ok = |m: &str, p: &str, b: Value| spec.validate_request(m, p, Some(&b));
    assert!(ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256})
    )
    .is_ok());
    assert!(ok("PUT", "/drives/rootfs", json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/x", "is_read_only": true})).is_ok());
    let bad: Vec<(&str, &str, Value, &str)> = vec![
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2}),
            "required property \"mem_size_mib\"",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 1}),
            "expected integer",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 33, "mem_size_mib": 1}),
            "maximum",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 1, "memory": 1}),
            "unknown property",
        ),
        (
            "PUT",
            "/actions",
            json!({"action_type": "Boot"}),
            "is not one of",
        ),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": 2, "uds_path": "v"}),
            "minimum",
        ),
        (
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": "s", "mem_backend": {"backend_type": "Disk", "backend_path": "m"}}),
            "body.mem_backend.backend_type",
        ),
        ("PUT", "/nowhere", json!({}), "no path"),
        ("DELETE", "/drives/x", json!({}), "not an operation"),
    ];
    for (m, p, b, want) in bad {
        let errs = spec
            .validate_request(m, p, Some(&b))
            .unwrap_err()
            .join("; ");
        assert!(
            errs.contains(want),
            "{m} {p} {b}: {errs:?} should mention {want:?}"
        );
    }
    assert!(
        spec.validate_request("PUT", "/actions", None).is_err(),
        "missing body"
    );
    assert!(spec.validate_request("GET", "/", None).is_ok());
    assert!(spec.validate_response("PUT", "/actions", 204, None).is_ok());
    assert!(spec
        .validate_response("PUT", "/actions", 400, Some(&json!({"fault_message": "x"})))
        .is_ok());
    assert!(spec
        .validate_response("GET", "/", 200, Some(&json!({"id": "x"})))
        .is_err());
}

#[test]
fn every_request_the_runtime_builds_matches_the_spec() {
    let spec = Spec::load();
    let (rt, _dir) = runtime_with(&fake_binary(), false);
    for limits in [
        Limits::default(),
        Limits {
            cpu_cores: Some(3.5),
            memory_bytes: Some(2 << 30),
            pids: Some(10),
            scratch_bytes: Some(1 << 30),
        },
    ] {
        let shape = VmShape::from_limits(&limits, &rt.config().default_limits);
        for (m, p, b) in rt
            .boot_requests(&shape)
            .into_iter()
            .chain(rt.restore_requests(Path::new("/snap")))
        {
            if let Err(e) = spec.validate_request(m, &p, Some(&b)) {
                panic!("{m} {p} {b}: {e:?}");
            }
        }
    }
    for (m, p, b) in [
        ("PATCH", "/vm", json!({"state": "Paused"})),
        (
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": "/a", "mem_file_path": "/b"}),
        ),
    ] {
        spec.validate_request(m, p, Some(&b)).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The Firecracker double (this binary re-executed).

#[derive(Default)]
struct DoubleState {
    started: bool,
    paused: bool,
    loaded: bool,
    configured: Vec<String>,
    vsock_uds: Option<String>,
    agent: Option<tokio::process::Child>,
    id: String,
}

/// Entry point of the double. Ignored in normal runs; the wrapper script runs it with
/// `--ignored --exact fc_double_main`.
#[test]
#[ignore]
fn fc_double_main() {
    let Ok(args) = std::env::var("FC_DOUBLE_ARGS") else {
        return;
    };
    let args: Vec<&str> = args.split_whitespace().collect();
    let sock = args[args.iter().position(|a| *a == "--api-sock").unwrap() + 1].to_string();
    let id = args[args.iter().position(|a| *a == "--id").unwrap() + 1].to_string();
    // Firecracker refuses instance ids outside [a-zA-Z0-9-]{1,64} at start
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        eprintln!("Invalid instance ID: {id}");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(double_serve(sock, id));
}

async fn double_serve(sock: String, id: String) {
    let spec = std::sync::Arc::new(Spec::load());
    let log = std::env::var("FC_DOUBLE_LOG").unwrap();
    let fault = std::env::var("FC_DOUBLE_FAULT").unwrap_or_default();
    let listener = UnixListener::bind(&sock).unwrap();
    let state = std::sync::Arc::new(tokio::sync::Mutex::new(DoubleState {
        id,
        ..Default::default()
    }));
    loop {
        let (conn, _) = listener.accept().await.unwrap();
        let (spec, state, log, fault) = (spec.clone(), state.clone(), log.clone(), fault.clone());
        tokio::spawn(async move {
            let _ = double_conn(conn, &spec, &state, &log, &fault).await;
        });
    }
}

async fn double_conn(
    conn: UnixStream,
    spec: &Spec,
    state: &tokio::sync::Mutex<DoubleState>,
    log: &str,
    fault: &str,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut length = 0;
        let mut headers_ok = true;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("content-type") && v.trim() != "application/json" {
                    headers_ok = false;
                }
            }
        }
        let mut buf = vec![0; length];
        r.read_exact(&mut buf).await?;
        let body: Option<Value> = if buf.is_empty() {
            None
        } else {
            serde_json::from_slice(&buf).ok()
        };
        let mut violations = match spec.validate_request(&method, &path, body.as_ref()) {
            Ok(_) => vec![],
            Err(e) => e,
        };
        if !headers_ok {
            violations.push("Content-Type is not application/json".into());
        }
        if length > 0 && body.is_none() {
            violations.push("the body is not JSON".into());
        }
        let (status, answer) = if !violations.is_empty() {
            (
                400,
                Some(
                    json!({"fault_message": format!("invalid request: {}", violations.join("; "))}),
                ),
            )
        } else if fault == format!("{method} {path}") {
            (
                400,
                Some(json!({"fault_message": format!("injected fault on {method} {path}")})),
            )
        } else {
            double_apply(state, &method, &path, body.as_ref().unwrap_or(&Value::Null)).await
        };
        let mut answer_errs = Vec::new();
        if let Err(e) = spec.validate_response(&method, &path, status, answer.as_ref()) {
            if !violations
                .iter()
                .any(|v| v.contains("no path") || v.contains("not an operation"))
            {
                answer_errs.push(e);
            }
        }
        let entry = json!({"method": method, "path": path, "body": body, "status": status, "violations": violations, "answer": answer, "answer_violations": answer_errs});
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            writeln!(f, "{entry}")?;
        }
        let payload = answer.map(|a| a.to_string()).unwrap_or_default();
        let reason = if status == 204 {
            "No Content"
        } else if status == 200 {
            "OK"
        } else {
            "Bad Request"
        };
        let mut resp = format!(
            "HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        );
        if !payload.is_empty() {
            resp.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        resp.push_str("\r\n");
        resp.push_str(&payload);
        r.get_mut().write_all(resp.as_bytes()).await?;
    }
}

fn fault(msg: String) -> (u16, Option<Value>) {
    (400, Some(json!({ "fault_message": msg })))
}

/// Firecracker's rules, as far as Sparkla uses them.
async fn double_apply(
    state: &tokio::sync::Mutex<DoubleState>,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Option<Value>) {
    let mut s = state.lock().await;
    let pre_boot_only = [
        "/boot-source",
        "/machine-config",
        "/vsock",
        "/logger",
        "/metrics",
    ];
    match (method, path) {
        ("GET", "/") => (
            200,
            Some(
                json!({"app_name": "Firecracker", "id": s.id, "state": if s.paused { "Paused" } else if s.started { "Running" } else { "Not started" }, "vmm_version": "1.17.0-double"}),
            ),
        ),
        ("PUT", p) if pre_boot_only.contains(&p) || p.starts_with("/drives/") => {
            if s.started || s.loaded {
                return fault(format!(
                    "The requested operation is not supported after starting the microVM ({p})"
                ));
            }
            if p.starts_with("/drives/") && body["drive_id"].as_str() != p.strip_prefix("/drives/")
            {
                return fault("The id from the path does not match the id from the body!".into());
            }
            if p == "/vsock" {
                s.vsock_uds = body["uds_path"].as_str().map(str::to_string);
            }
            if p == "/boot-source"
                && !Path::new(body["kernel_image_path"].as_str().unwrap_or("")).is_file()
            {
                return fault(
                    "Cannot open kernel image: No such file or directory (os error 2)".into(),
                );
            }
            if p.starts_with("/drives/")
                && !Path::new(body["path_on_host"].as_str().unwrap_or("")).is_file()
            {
                return fault("Unable to open the block device backing file: No such file or directory (os error 2)".into());
            }
            s.configured.push(p.to_string());
            (204, None)
        }
        ("PUT", "/actions") if body["action_type"] == "InstanceStart" => {
            if s.started || s.loaded {
                return fault(
                    "The requested operation is not supported after starting the microVM.".into(),
                );
            }
            for need in ["/boot-source", "/drives/rootfs"] {
                if !s.configured.iter().any(|c| c == need) {
                    return fault(format!("Cannot start microvm without {need} configured"));
                }
            }
            s.started = true;
            let uds = s.vsock_uds.clone();
            boot_guest(&mut s, uds).await;
            (204, None)
        }
        ("PATCH", "/vm") => {
            if !s.started {
                return fault(
                    "The requested operation is not supported before starting the microVM.".into(),
                );
            }
            s.paused = body["state"] == "Paused";
            (204, None)
        }
        ("PUT", "/snapshot/create") => {
            if !s.paused {
                return fault(
                    "Cannot create a snapshot of a running microVM: pause it first".into(),
                );
            }
            let snap = json!({"vsock_uds": s.vsock_uds, "configured": s.configured});
            std::fs::write(body["snapshot_path"].as_str().unwrap(), snap.to_string()).unwrap();
            std::fs::write(body["mem_file_path"].as_str().unwrap(), "memory").unwrap();
            (204, None)
        }
        ("PUT", "/snapshot/load") => {
            if s.started
                || !s
                    .configured
                    .iter()
                    .all(|c| c == "/logger" || c == "/metrics")
            {
                return fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
            }
            let Ok(snap) = std::fs::read_to_string(body["snapshot_path"].as_str().unwrap_or(""))
            else {
                return fault(
                    "Cannot open the snapshot file: No such file or directory (os error 2)".into(),
                );
            };
            let mem = body["mem_backend"]["backend_path"]
                .as_str()
                .or(body["mem_file_path"].as_str());
            if !mem.map(|m| Path::new(m).is_file()).unwrap_or(false) {
                return fault(
                    "Cannot open the memory file: No such file or directory (os error 2)".into(),
                );
            }
            let snap: Value = serde_json::from_str(&snap).unwrap();
            // the snapshot's drives must be there, relative to our working directory
            if !Path::new("scratch.ext4").is_file() {
                return fault("Unable to open the block device backing file scratch.ext4".into());
            }
            let uds = body["vsock_override"]["uds_path"]
                .as_str()
                .or(snap["vsock_uds"].as_str())
                .map(str::to_string);
            s.loaded = true;
            s.vsock_uds = uds.clone();
            if body["resume_vm"] == true {
                s.started = true;
                boot_guest(&mut s, uds).await;
            }
            (204, None)
        }
        _ => fault(format!(
            "Invalid request method and/or path: {method} {path}"
        )),
    }
}

/// "Boot" the guest: the real agent on a Unix socket, and the hybrid vsock in front of it.
async fn boot_guest(s: &mut DoubleState, uds: Option<String>) {
    let agent_sock = std::env::current_dir().unwrap().join("guest-agent.sock");
    let agent = std::env::var("SPARKLA_AGENT").unwrap();
    let mut cmd = tokio::process::Command::new(agent);
    cmd.arg("--listen")
        .arg(format!("unix:{}", agent_sock.display()))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    s.agent = Some(cmd.spawn().unwrap());
    let Some(uds) = uds else { return };
    let listener = UnixListener::bind(&uds).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let agent_sock = agent_sock.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                let mut line = String::new();
                if conn.read_line(&mut line).await.is_err() {
                    return;
                }
                if line.trim() != "CONNECT 1024" {
                    return; // nothing listens on that port: Firecracker closes the connection
                }
                let Ok(mut agent) = UnixStream::connect(&agent_sock).await else {
                    return; // the guest's agent is not up yet
                };
                if conn.get_mut().write_all(b"OK 1073741824\n").await.is_err() {
                    return;
                }
                let mut conn = conn.into_inner();
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut agent).await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// Helpers of the tests that drive the runtime against the double.

fn agent_or_skip(test: &str) -> Option<PathBuf> {
    let a = common::agent_path();
    if a.is_none() {
        skipped(&format!(
            "{test}: sparkla-agent is not built (cargo build -p sparkla-agent)"
        ));
    }
    a
}

/// A wrapper script that runs this binary as the Firecracker double.
fn double_binary(dir: &Path, fault: &str) -> PathBuf {
    let script = dir.join("firecracker");
    let exe = std::env::current_exe().unwrap();
    let agent = common::agent_path().unwrap();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nFC_DOUBLE_ARGS=\"$*\" FC_DOUBLE_LOG='{log}' FC_DOUBLE_FAULT='{fault}' SPARKLA_AGENT='{agent}' exec '{exe}' --ignored --exact --nocapture --test-threads=1 -q fc_double_main \"vm:$2\"\n",
            log = dir.join("requests.jsonl").display(),
            agent = agent.display(),
            exe = exe.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn fake_binary() -> PathBuf {
    PathBuf::from("/bin/true")
}

/// A runtime whose `firecracker` is `binary`, with a dummy kernel and rootfs, in a fresh
/// base directory (returned with it).
fn runtime_with(binary: &Path, snapshots: bool) -> (FirecrackerRuntime, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sparkla-fc-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("vmlinux"), "kernel").unwrap();
    std::fs::write(dir.path().join("rootfs.ext4"), "rootfs").unwrap();
    let mut c = FirecrackerConfig::new("tfc");
    c.firecracker = binary.to_path_buf();
    c.kernel = dir.path().join("vmlinux");
    c.rootfs = dir.path().join("rootfs.ext4");
    c.base_dir = dir.path().join("vms");
    c.check_kvm = false;
    c.snapshots = snapshots;
    c.boot_timeout = Duration::from_secs(30);
    std::fs::create_dir_all(&c.base_dir).unwrap();
    (FirecrackerRuntime::new(c).unwrap(), dir)
}

fn requests(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("requests.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_all_valid(reqs: &[Value]) {
    assert!(!reqs.is_empty(), "the double saw no request");
    for r in reqs {
        assert_eq!(r["violations"], json!([]), "request broke the spec: {r}");
        assert_eq!(
            r["answer_violations"],
            json!([]),
            "the double answered off-spec: {r}"
        );
    }
}

fn calls(reqs: &[Value]) -> Vec<String> {
    reqs.iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect()
}

/// Processes whose command line mentions `needle` (the double, the agent and its kernels
/// carry the test's directory in their arguments or working directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if cmd.contains(needle) || cwd.contains(needle) {
            out.push(format!("pid {pid} {cmd} (cwd {cwd})"));
        }
    }
    out
}

async fn assert_nothing_left(dir: &Path) {
    let needle = dir.join("vms").display().to_string();
    let mut left = processes_mentioning(&needle);
    for _ in 0..150 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = processes_mentioning(&needle);
    }
    assert!(left.is_empty(), "processes left: {left:#?}");
    let homes: Vec<_> = std::fs::read_dir(dir.join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(homes.is_empty(), "VM homes left: {homes:?}");
}

async fn begin(
    rt: &FirecrackerRuntime,
    id: &str,
) -> Result<(Box<dyn sparkla_runtime::Instance>, AgentClient), RuntimeError> {
    common::conformance::begin(rt, common::conformance::spec(id)).await
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_boot_against_the_double_executes_and_leaves_nothing() {
    if agent_or_skip("cold_boot_against_the_double").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rt, dir) = runtime_with(&double_binary(tmp.path(), ""), false);
    let (inst, client) = begin(&rt, "cold").await.expect("begin");
    let py = common::conformance::exec(&client, "python", "1+1").await;
    assert_eq!(common::conformance::outputs(&py), vec![json!(2)], "{py}");
    let sh = common::conformance::exec(&client, "bash", "echo via vsock").await;
    assert_eq!(common::conformance::text(&sh), "via vsock\n");
    // the home holds what the README says
    let home = std::fs::read_dir(dir.path().join("vms"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    for f in [
        "api.sock",
        "log.fifo",
        "metrics.fifo",
        "v.sock",
        "scratch.ext4",
        "vmm.pid",
        "firecracker.out",
    ] {
        assert!(home.join(f).exists(), "{f} missing from {}", home.display());
    }
    // the API answers GET / as the spec documents
    let info = ApiClient::new(home.join("api.sock"))
        .get("/")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    common::conformance::end(inst, client).await;

    let reqs = requests(tmp.path());
    assert_all_valid(&reqs);
    let c = calls(&reqs);
    assert_eq!(
        c[..8],
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /drives/scratch",
            "PUT /vsock",
            "PUT /actions"
        ],
        "{c:?}"
    );
    let mc = &reqs[2]["body"];
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(1), Some(512))
    );
    assert_eq!(reqs[4]["body"]["is_read_only"], true);
    assert_eq!(reqs[5]["body"]["is_read_only"], false);
    assert!(reqs[3]["body"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("sparkla.listen=vsock:1024"));
    assert_nothing_left(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_are_surfaced_and_reclaimed() {
    if agent_or_skip("api_faults_are_surfaced_and_reclaimed").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rt, dir) = runtime_with(&double_binary(tmp.path(), "PUT /machine-config"), false);
    let err = match rt.start(common::conformance::spec("fault")).await {
        Ok(_) => panic!("a refused machine-config started anyway"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("PUT /machine-config was refused by Firecracker (HTTP 400): injected fault on PUT /machine-config")
            && err.contains("session fault"),
        "{err}"
    );
    assert_all_valid(&requests(tmp.path()));
    assert_nothing_left(dir.path()).await;

    // A spec-breaking value is refused by the double the way Firecracker would, and the
    // runtime says which request and why.
    let api_dir = tempfile::tempdir().unwrap();
    let sock = api_dir.path().join("api.sock");
    let script = double_binary(api_dir.path(), "");
    let mut child = tokio::process::Command::new(&script)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--id")
        .arg("x")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if UnixStream::connect(&sock).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let api = ApiClient::new(&sock);
    let e = api
        .put(
            "/machine-config",
            &json!({"vcpu_count": 64, "mem_size_mib": 128}),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Fault { status: 400, .. }), "{e}");
    assert!(e.to_string().contains("64 > maximum 32"), "{e}");
    let e = api
        .put("/actions", &json!({"action_type": "InstanceStart"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("without /boot-source"), "{e}");
    let _ = child.kill().await;
    let e = ApiClient::new(api_dir.path().join("none.sock"))
        .get("/")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Io { .. })
            && e.to_string().contains("cannot reach the Firecracker API"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_against_the_double() {
    if agent_or_skip("snapshot_then_restore_against_the_double").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rt, dir) = runtime_with(&double_binary(tmp.path(), ""), true);
    let (inst, client) = begin(&rt, "restored").await.expect("begin from a snapshot");
    let py = common::conformance::exec(&client, "python", "6*7").await;
    assert_eq!(common::conformance::outputs(&py), vec![json!(42)], "{py}");
    common::conformance::end(inst, client).await;
    let reqs = requests(tmp.path());
    assert_all_valid(&reqs);
    let c = calls(&reqs);
    let tail: Vec<&str> = c.iter().map(String::as_str).skip(8).collect();
    assert_eq!(
        tail,
        [
            "PATCH /vm",
            "PUT /snapshot/create",
            "PUT /logger",
            "PUT /metrics",
            "PUT /snapshot/load"
        ],
        "{c:?}"
    );
    let load = &reqs.last().unwrap()["body"];
    assert_eq!(load["resume_vm"], true);
    assert_eq!(load["vsock_override"]["uds_path"], "v.sock");
    // a second session restores from the same snapshot without booting a template again
    let (inst, client) = begin(&rt, "restored-2").await.expect("second restore");
    assert_eq!(
        common::conformance::outputs(&common::conformance::exec(&client, "python", "1").await),
        vec![json!(1)]
    );
    common::conformance::end(inst, client).await;
    assert_eq!(
        calls(&requests(tmp.path()))
            .iter()
            .filter(|c| *c == "PUT /snapshot/create")
            .count(),
        1
    );
    // the snapshot directory is the template's home: the sweep reclaims it
    let swept = rt.sweep().await.unwrap();
    assert_eq!(swept.directories, 1, "{swept:?}");
    assert_nothing_left(dir.path()).await;
}

#[tokio::test]
async fn kvm_access_is_checked_and_explained() {
    let mut c = FirecrackerConfig::new("t");
    c.check_kvm = true;
    match sparkla_runtime::vm::kvm_accessible() {
        Ok(()) => {
            // KVM is accessible: the runtime goes on to the binary check
            c.firecracker = "/nonexistent/firecracker".into();
            let e = FirecrackerRuntime::new(c).unwrap_err().to_string();
            assert!(e.contains("firecracker binary"), "{e}");
        }
        Err(why) => {
            let e = FirecrackerRuntime::new(c).unwrap_err().to_string();
            assert!(e.contains(&why), "{e}");
            if why.contains("access") {
                assert!(e.contains("setfacl -m u:$USER:rw /dev/kvm"), "{e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hybrid-vsock handshake against a double of Firecracker's vsock socket.

/// A vsock socket double: expects `CONNECT <port>\n`, answers `reply`, then proxies to a
/// real agent process over its stdio (when `agent` is given).
async fn vsock_double(
    uds: &Path,
    reply: &'static str,
    agent: Option<PathBuf>,
) -> tokio::task::JoinHandle<String> {
    let listener = UnixListener::bind(uds).unwrap();
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        if reply.is_empty() {
            return line; // close: nothing listens on that port
        }
        conn.get_mut().write_all(reply.as_bytes()).await.unwrap();
        if let Some(agent) = agent {
            let mut child = tokio::process::Command::new(agent)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let (mut r, mut w) = conn.into_inner().into_split();
            let a = async {
                tokio::io::copy(&mut r, &mut stdin).await.ok();
                drop(stdin);
            };
            let b = async {
                tokio::io::copy(&mut stdout, &mut w).await.ok();
            };
            tokio::join!(a, b);
            let _ = child.kill().await;
        }
        line
    })
}

#[tokio::test]
async fn hybrid_vsock_handshake_reaches_a_real_agent() {
    let Some(agent) = agent_or_skip("hybrid_vsock_handshake_reaches_a_real_agent") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let double = vsock_double(&uds, "OK 1073741824\n", Some(agent)).await;
    let (stream, host_port) = vsock::connect(&uds, 1024).await.expect("handshake");
    assert_eq!(host_port, 1073741824);
    let (r, w) = stream.into_split();
    let client = AgentClient::new(Box::new(r), Box::new(w));
    tokio::time::timeout(Duration::from_secs(60), client.ready())
        .await
        .unwrap()
        .unwrap();
    let py = common::conformance::exec(&client, "python", "'through vsock'").await;
    assert_eq!(
        common::conformance::outputs(&py),
        vec![json!("through vsock")]
    );
    drop(client);
    assert_eq!(
        double.await.unwrap(),
        "CONNECT 1024\n",
        "the exact handshake line"
    );
}

#[tokio::test]
async fn hybrid_vsock_failures_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    // nothing listens on the port in the guest: Firecracker closes the connection
    let uds = dir.path().join("closed.sock");
    let d = vsock_double(&uds, "", None).await;
    let e = vsock::connect(&uds, 52).await.unwrap_err().to_string();
    assert!(e.contains("closed after CONNECT 52"), "{e}");
    assert_eq!(d.await.unwrap(), "CONNECT 52\n");
    // a garbled answer
    let uds = dir.path().join("garbled.sock");
    let _d = vsock_double(&uds, "NOPE\n", None).await;
    let e = vsock::connect(&uds, 1024).await.unwrap_err().to_string();
    assert!(e.contains("expected \"OK <port>\", got \"NOPE\""), "{e}");
    // no socket at all, retried until the deadline
    let e = vsock::connect_retry(
        &dir.path().join("none.sock"),
        1024,
        Duration::from_millis(100),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no guest listened on vsock port 1024") && e.contains("No such file"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_instance_reclaims_the_vm() {
    if agent_or_skip("dropping_an_instance_reclaims_the_vm").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rt, dir) = runtime_with(&double_binary(tmp.path(), ""), false);
    let (inst, client) = begin(&rt, "dropped").await.expect("begin");
    assert!(!processes_mentioning(&dir.path().join("vms").display().to_string()).is_empty());
    drop(client);
    drop(inst);
    assert_nothing_left(dir.path()).await;
}

/// A crashed server leaves a running VMM and its home: a new runtime of the same server id
/// sweeps both at start, and leaves other servers' homes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_reclaims_the_vms_of_a_crashed_server() {
    if agent_or_skip("sweep_reclaims_the_vms_of_a_crashed_server").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rt, dir) = runtime_with(&double_binary(tmp.path(), ""), false);
    let (inst, client) = begin(&rt, "crashed").await.expect("begin");
    // the "crash": nothing of the instance runs its cleanup
    std::mem::forget(inst);
    std::mem::forget(client);
    let vms = dir.path().join("vms");
    let foreign = vms.join("vm-otherserver-x-1-0");
    std::fs::create_dir_all(&foreign).unwrap();
    assert!(!processes_mentioning(&vms.display().to_string()).is_empty());
    let report = rt.sweep().await.unwrap();
    assert_eq!((report.processes, report.directories), (1, 1), "{report:?}");
    assert!(foreign.exists(), "another server's home was swept");
    std::fs::remove_dir_all(&foreign).unwrap();
    assert_nothing_left(dir.path()).await;
}
