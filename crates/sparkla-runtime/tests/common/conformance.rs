//! The runtime conformance suite: what every runtime (sandbox, docker, firecracker) must do.
//! Each check takes a `&dyn Runtime` and a unique id prefix, starts real instances with the
//! real agent, and asserts on what comes back. Use [`run_all`] or the checks one by one.
#![allow(dead_code)]

use serde_json::{json, Value};
use sparkla_runtime::{
    AgentClient, Instance, InstanceSpec, InstanceState, Limits, Runtime, RuntimeError,
};
use std::time::Duration;

/// How long an agent may take to get ready (debug builds, loaded CI machines).
pub const READY: Duration = Duration::from_secs(60);

pub fn spec(id: &str) -> InstanceSpec {
    InstanceSpec {
        session_id: id.to_string(),
        ..Default::default()
    }
}

/// Start an instance and wait for its agent.
pub async fn begin(
    rt: &dyn Runtime,
    spec: InstanceSpec,
) -> Result<(Box<dyn Instance>, AgentClient), RuntimeError> {
    sparkla_runtime::sandbox::pool::start_ready(rt, spec, READY).await
}

pub fn chunk(lang: &str, code: &str) -> Value {
    json!({"type": "CodeChunk", "programmingLanguage": lang, "text": code})
}

/// Execute code in `lang`; returns the executed node.
pub async fn exec(client: &AgentClient, lang: &str, code: &str) -> Value {
    client
        .execute(&format!("j-{}", rand_suffix()), chunk(lang, code), None)
        .await
        .unwrap_or_else(|e| panic!("executing {lang} {code:?}: {e}"))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The outputs of an executed chunk as JSON (empty if none).
pub fn outputs(node: &Value) -> Vec<Value> {
    node.get("outputs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The text of all string outputs, concatenated.
pub fn text(node: &Value) -> String {
    outputs(node)
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("")
}

pub fn errors(node: &Value) -> Vec<Value> {
    node.get("errors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// End an instance and check it is gone.
pub async fn end(mut instance: Box<dyn Instance>, client: AgentClient) {
    instance.stop().await.expect("stop");
    assert!(
        matches!(instance.state().await, InstanceState::Exited { .. }),
        "stopped instance still running"
    );
    drop(client);
}

/// Begin, execute `1+1` in python, `echo` in bash and `1+1` in javascript, end.
pub async fn executes_each_language(rt: &dyn Runtime, prefix: &str) {
    let (inst, client) = begin(rt, spec(&format!("{prefix}-lang")))
        .await
        .expect("begin");
    let ready = client.ready_info().expect("ready");
    for lang in ["python", "bash", "javascript"] {
        assert!(
            ready.languages.iter().any(|l| l.name == lang),
            "{lang} missing from the agent's languages: {:?}",
            ready.languages
        );
    }
    let py = exec(&client, "python", "1+1").await;
    assert_eq!(outputs(&py), vec![json!(2)], "python: {py}");
    let sh = exec(&client, "bash", "echo hello from bash").await;
    assert_eq!(text(&sh), "hello from bash\n", "bash: {sh}");
    let js = exec(&client, "javascript", "1+1").await;
    assert_eq!(outputs(&js), vec![json!(2)], "javascript: {js}");
    end(inst, client).await;
}

/// Variables survive between executions in every language.
pub async fn state_persists(rt: &dyn Runtime, prefix: &str) {
    let (inst, client) = begin(rt, spec(&format!("{prefix}-state")))
        .await
        .expect("begin");
    exec(&client, "python", "x = 41").await;
    assert_eq!(
        outputs(&exec(&client, "python", "x + 1").await),
        vec![json!(42)]
    );
    exec(&client, "bash", "Y=bash-state").await;
    assert_eq!(
        text(&exec(&client, "bash", "echo $Y").await),
        "bash-state\n"
    );
    exec(&client, "javascript", "var z = 20").await;
    assert_eq!(
        outputs(&exec(&client, "javascript", "z * 2").await),
        vec![json!(40)]
    );
    // A crashing execution leaves the session usable.
    let e = exec(&client, "python", "raise ValueError('boom')").await;
    assert_eq!(errors(&e)[0]["errorType"], "ValueError", "{e}");
    assert_eq!(
        outputs(&exec(&client, "python", "x").await),
        vec![json!(41)]
    );
    end(inst, client).await;
}

/// A memory limit holds: a 1 GiB allocation under 256 MiB fails in the session (OOM kill
/// counted or MemoryError), and the instance reports it.
pub async fn memory_limit_holds(rt: &dyn Runtime, prefix: &str) {
    let mut s = spec(&format!("{prefix}-mem"));
    s.limits = Limits {
        memory_bytes: Some(256 << 20),
        ..Default::default()
    };
    let (inst, client) = begin(rt, s).await.expect("begin");
    let node = exec(
        &client,
        "python",
        "b = bytearray(1 << 30)\nfor i in range(0, len(b), 4096): b[i] = 1\nlen(b)",
    )
    .await;
    let errs = errors(&node);
    assert!(
        !errs.is_empty(),
        "a 1 GiB allocation under a 256 MiB limit succeeded: {node}"
    );
    assert!(
        !outputs(&node).contains(&json!(1u64 << 30)),
        "allocation completed: {node}"
    );
    let oom = inst.oom_kills().await;
    let msg = errs[0]["errorType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        oom > 0 || msg == "MemoryError",
        "neither an OOM kill nor a MemoryError: oom_kills={oom} errors={errs:?}"
    );
    end(inst, client).await;
}

/// Ending an instance kills background processes started in it.
pub async fn end_kills_background_processes(rt: &dyn Runtime, prefix: &str) {
    let (inst, client) = begin(rt, spec(&format!("{prefix}-bg")))
        .await
        .expect("begin");
    exec(
        &client,
        "bash",
        "(sleep 1000 &) ; nohup sleep 1001 >/dev/null 2>&1 &",
    )
    .await;
    // The backgrounded sleeps may not have exec'd yet on a loaded machine: wait up to 5 s.
    let ps = exec(
        &client,
        "bash",
        "for i in $(seq 50); do n=$(ps -eo comm | grep -c '^sleep'); [ \"$n\" = 2 ] && break; sleep 0.1; done; echo $n",
    )
    .await;
    assert_eq!(text(&ps).trim(), "2", "{ps}");
    end(inst, client).await;
}

/// Run the whole suite.
pub async fn run_all(rt: &dyn Runtime, prefix: &str) {
    executes_each_language(rt, prefix).await;
    state_persists(rt, prefix).await;
    memory_limit_holds(rt, prefix).await;
    end_kills_background_processes(rt, prefix).await;
}
