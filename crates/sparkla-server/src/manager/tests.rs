//! Unit tests of the manager's logic over a fake runtime (an in-memory agent that echoes
//! code as output). The real runtime and agent are exercised by the server's integration
//! tests.

use super::*;
use async_trait::async_trait;
use sparkla_runtime::{BoxRead, BoxWrite, InstanceState, RuntimeError, SweepReport};
use std::sync::atomic::AtomicUsize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct Fake {
    started: AtomicUsize,
    live: Arc<AtomicUsize>,
    /// Kill switches of the instances' agents, by session id.
    kills: Mutex<HashMap<String, Vec<tokio::sync::oneshot::Sender<()>>>>,
    fail_start: AtomicBool,
}

struct FakeInstance {
    id: String,
    stream: Mutex<Option<(BoxRead, BoxWrite)>>,
    live: Arc<AtomicUsize>,
    stopped: bool,
}

#[async_trait]
impl Runtime for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn prepare(&self, _: Option<&str>) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        if self.fail_start.load(Ordering::SeqCst) {
            return Err(RuntimeError::Start {
                session_id: spec.session_id,
                reason: "fake refuses".into(),
            });
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        let (host, agent) = tokio::io::duplex(1 << 16);
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
        self.kills
            .lock()
            .unwrap()
            .entry(spec.session_id.clone())
            .or_default()
            .push(kill_tx);
        tokio::spawn(fake_agent(agent, kill_rx));
        let (r, w) = tokio::io::split(host);
        Ok(Box::new(FakeInstance {
            id: spec.session_id,
            stream: Mutex::new(Some((Box::new(r), Box::new(w)))),
            live: self.live.clone(),
            stopped: false,
        }))
    }
    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        Ok(SweepReport::default())
    }
}

#[async_trait]
impl Instance for FakeInstance {
    fn session_id(&self) -> &str {
        &self.id
    }
    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.stream.get_mut().unwrap().take()
    }
    async fn state(&self) -> InstanceState {
        InstanceState::Running
    }
    async fn oom_kills(&self) -> u64 {
        0
    }
    async fn stop(&mut self) -> Result<(), RuntimeError> {
        if !self.stopped {
            self.stopped = true;
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for FakeInstance {
    fn drop(&mut self) {
        if !self.stopped {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers execute with `outputs: [text]` (text "sleep" waits for cancel), cancel, shutdown.
async fn fake_agent(io: tokio::io::DuplexStream, kill: tokio::sync::oneshot::Receiver<()>) {
    let (r, w) = tokio::io::split(io);
    let w = Arc::new(tokio::sync::Mutex::new(w));
    let send = |w: Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio::io::DuplexStream>>>,
                v: Value| async move {
        let mut line = v.to_string();
        line.push('\n');
        let _ = w.lock().await.write_all(line.as_bytes()).await;
    };
    send(
        w.clone(),
        json!({"jsonrpc":"2.0","method":"ready","params":{"version":"0","pid":1,"languages":[]}}),
    )
    .await;
    let sleepers: Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>> =
        Default::default();
    let mut lines = BufReader::new(r).lines();
    let mut kill = kill;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => match l { Ok(Some(l)) => l, _ => return },
            _ = &mut kill => return,
        };
        let req: Value = serde_json::from_str(&line).unwrap();
        let id = req["id"].clone();
        match req["method"].as_str().unwrap() {
            "execute" => {
                let mut node = req["params"]["node"].clone();
                let job = req["params"]["job"].as_str().unwrap().to_string();
                let w = w.clone();
                let sleepers = sleepers.clone();
                tokio::spawn(async move {
                    if node["text"] == "sleep" {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        sleepers.lock().unwrap().insert(job, tx);
                        let _ = rx.await;
                        node["errors"] = json!([{"type":"CodeError","errorType":"Cancelled","errorMessage":"cancelled"}]);
                    } else {
                        node["outputs"] = json!([node["text"].clone()]);
                    }
                    send(w, json!({"jsonrpc":"2.0","id":id,"result":node})).await;
                });
            }
            "cancel" => {
                let job = req["params"]["job"].as_str().unwrap();
                let found = sleepers
                    .lock()
                    .unwrap()
                    .remove(job)
                    .map(|tx| tx.send(()))
                    .is_some();
                send(w.clone(), json!({"jsonrpc":"2.0","id":id,"result":found})).await;
            }
            "shutdown" => {
                send(w.clone(), json!({"jsonrpc":"2.0","id":id,"result":true})).await;
                return;
            }
            _ => {
                send(
                    w.clone(),
                    json!({"jsonrpc":"2.0","id":id,"error":{"code":-32601,"message":"nope"}}),
                )
                .await
            }
        }
    }
}

fn manager(fake: Arc<Fake>, f: impl FnOnce(&mut ManagerConfig)) -> SessionManager {
    let mut c = ManagerConfig {
        cpu_total: 4.0,
        memory_total: 4.0,
        ..Default::default()
    };
    f(&mut c);
    SessionManager::new(fake, c)
}

fn client(id: &str) -> ClientInfo {
    ClientInfo {
        id: id.into(),
        ..Default::default()
    }
}

fn connect(m: &SessionManager, c: &ClientInfo) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(64);
    m.connect(c, tx);
    rx
}

fn chunk(text: &str) -> Value {
    json!({"type":"CodeChunk","programmingLanguage":"python","text":text})
}

#[tokio::test]
async fn begin_execute_end() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |_| {});
    let a = client("a");
    let mut notes = connect(&m, &a);
    let s = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert_eq!(s["status"], "started");
    assert!(names::is_session_id(s["id"].as_str().unwrap()));
    assert!(s["dateStart"]["value"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["cpuRequest"], 1);
    assert_eq!(m.free(), (3.0, 3.0));
    let out = m
        .execute(&a, chunk("6*7"), Some(s.clone()), None)
        .await
        .unwrap();
    assert_eq!(out["outputs"], json!(["6*7"]));
    let ended = m.end(&a, s.clone()).await.unwrap();
    assert_eq!(ended["status"], "stopped");
    assert!(ended["dateEnd"].is_object());
    let n = notes.recv().await.unwrap();
    assert_eq!(n.level, Level::Info);
    assert_eq!(
        n.message,
        format!("Ending session \"{}\".", s["name"].as_str().unwrap())
    );
    assert_eq!(m.free(), (4.0, 4.0));
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
    // Executing in an ended session.
    let out = m
        .execute(&a, chunk("1"), Some(s.clone()), None)
        .await
        .unwrap();
    assert_eq!(out["errors"][0]["errorMessage"], "Session is inactive.");
    // Ending it again is harmless.
    let again = m
        .end(&a, json!({"type":"SoftwareSession","id":s["id"]}))
        .await
        .unwrap();
    assert_eq!(again["status"], "stopped");
}

#[tokio::test]
async fn other_nodes_come_back_unchanged() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let a = client("a");
    let p = json!({"type":"Paragraph","content":["x"]});
    assert_eq!(m.begin(&a, p.clone()).await.unwrap(), p);
    assert_eq!(m.execute(&a, p.clone(), None, None).await.unwrap(), p);
    assert_eq!(m.end(&a, p.clone()).await.unwrap(), p);
    let begun = json!({"type":"SoftwareSession","dateStart":"2020-01-01"});
    assert_eq!(m.begin(&a, begun.clone()).await.unwrap(), begun);
}

#[tokio::test]
async fn insufficient_resources_and_release() {
    let m = manager(Arc::new(Fake::default()), |c| c.cpu_total = 1.5);
    let a = client("a");
    let s1 = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert_eq!(s1["status"], "started");
    let s2 = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert_eq!(s2["status"], "failed");
    assert_eq!(s2["description"], INSUFFICIENT_RESOURCES);
    let s3 = m
        .begin(&a, json!({"type":"SoftwareSession","cpuRequest":0.5}))
        .await
        .unwrap();
    assert_eq!(s3["status"], "started");
    m.end(&a, s1).await.unwrap();
    let s4 = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert_eq!(s4["status"], "started", "resources were released");
}

#[tokio::test]
async fn claims_cap_requests() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let a = ClientInfo {
        id: "a".into(),
        admin: false,
        session_claims: Some(
            json!({"cpuLimit":0.25,"memoryLimit":0.5})
                .as_object()
                .unwrap()
                .clone(),
        ),
    };
    let s = m
        .begin(
            &a,
            json!({"type":"SoftwareSession","cpuRequest":3,"cpuLimit":4,"memoryRequest":2}),
        )
        .await
        .unwrap();
    assert_eq!(s["cpuRequest"], 0.25);
    assert_eq!(s["cpuLimit"], 0.25);
    assert_eq!(s["memoryRequest"], 0.5);
    assert_eq!(m.free(), (3.75, 3.5));
}

#[tokio::test]
async fn bad_numbers_are_invalid_params() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let e = m
        .begin(
            &client("a"),
            json!({"type":"SoftwareSession","cpuRequest":"two"}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), -32602);
}

#[tokio::test]
async fn clients_limit_and_ownership() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let (a, b, c) = (client("a"), client("b"), client("c"));
    let _na = connect(&m, &a);
    let _nb = connect(&m, &b);
    let _nc = connect(&m, &c);
    let s = m
        .begin(&a, json!({"type":"SoftwareSession","clientsLimit":2}))
        .await
        .unwrap();
    let out = m
        .execute(&b, chunk("1"), Some(s.clone()), None)
        .await
        .unwrap();
    assert_eq!(out["outputs"], json!(["1"]), "b joins by id");
    let out = m
        .execute(&c, chunk("1"), Some(s.clone()), None)
        .await
        .unwrap();
    assert_eq!(out["errors"][0]["errorMessage"], MAX_CLIENTS);
    let e = m.end(&b, s.clone()).await.unwrap_err();
    assert_eq!(e.code(), -32005, "only the creator may end");
    let admin = ClientInfo {
        id: "z".into(),
        admin: true,
        session_claims: None,
    };
    assert_eq!(m.end(&admin, s).await.unwrap()["status"], "stopped");
}

#[tokio::test]
async fn invalid_and_unknown_session_ids() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let a = client("a");
    let out = m
        .execute(
            &a,
            chunk("1"),
            Some(json!({"type":"SoftwareSession","id":"nope"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        out["errors"][0]["errorMessage"],
        "Session id is invalid: nope"
    );
    let out = m
        .execute(
            &a,
            chunk("1"),
            Some(json!({"id": names::session_id()})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["errors"][0]["errorMessage"], NO_LONGER_AVAILABLE);
    let e = m
        .end(
            &a,
            json!({"type":"SoftwareSession","id":names::session_id()}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), -32602);
}

#[tokio::test]
async fn implicit_session_is_reused_and_ended_on_disconnect() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |_| {});
    let a = client("a");
    let _n = connect(&m, &a);
    m.execute(&a, chunk("1"), None, None).await.unwrap();
    m.execute(&a, chunk("2"), None, None).await.unwrap();
    assert_eq!(fake.started.load(Ordering::SeqCst), 1);
    assert_eq!(fake.live.load(Ordering::SeqCst), 1);
    m.disconnect(&a).await;
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
    assert_eq!(m.list()[0].status, SessionStatus::Stopped);
}

#[tokio::test]
async fn disconnect_spares_shared_and_admin_sessions() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |_| {});
    let (a, b) = (client("a"), client("b"));
    let admin = ClientInfo {
        id: "adm".into(),
        admin: true,
        session_claims: None,
    };
    let _na = connect(&m, &a);
    let _nb = connect(&m, &b);
    let _nadm = connect(&m, &admin);
    let s = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    m.execute(&b, chunk("1"), Some(s.clone()), None)
        .await
        .unwrap();
    let sa = m
        .begin(&admin, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    m.disconnect(&a).await;
    assert_eq!(
        m.session(s["id"].as_str().unwrap()).unwrap()["status"],
        "started"
    );
    m.disconnect(&b).await;
    assert_eq!(
        m.session(s["id"].as_str().unwrap()).unwrap()["status"],
        "stopped"
    );
    m.disconnect(&admin).await;
    assert_eq!(
        m.session(sa["id"].as_str().unwrap()).unwrap()["status"],
        "started"
    );
    m.shutdown().await;
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cancel_interrupts_a_job() {
    let m = manager(Arc::new(Fake::default()), |_| {});
    let a = client("a");
    let s = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert!(!m.cancel(&a, "j1").await.unwrap(), "no such job yet");
    let m2 = m.clone();
    let a2 = a.clone();
    let run = tokio::spawn(async move {
        m2.execute(&a2, chunk("sleep"), Some(s), Some("j1".into()))
            .await
    });
    let mut cancelled = false;
    for _ in 0..200 {
        if m.cancel(&a, "j1").await.unwrap() {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(cancelled);
    let out = run.await.unwrap().unwrap();
    assert_eq!(out["errors"][0]["errorType"], "Cancelled");
    assert!(!m.cancel(&client("b"), "j1").await.unwrap());
}

#[tokio::test]
async fn expiry_warns_then_ends() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |c| {
        c.duration_warning = Duration::from_secs(100);
        c.timeout_warning = Duration::from_secs(0);
        c.stale_period = Duration::from_millis(0);
    });
    let a = client("a");
    let mut notes = connect(&m, &a);
    let s = m
        .begin(
            &a,
            json!({"type":"SoftwareSession","durationRequest":0.3,"timeoutRequest":1000}),
        )
        .await
        .unwrap();
    m.expire().await;
    let n = notes.recv().await.unwrap();
    assert_eq!(n.level, Level::Warn);
    assert_eq!(
        n.message,
        "Session will reach maximum duration in 0 minutes"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    m.expire().await;
    let n = notes.recv().await.unwrap();
    assert_eq!(n.level, Level::Info);
    assert!(
        n.message
            .ends_with("Reached maximum duration of 0.3 seconds"),
        "{}",
        n.message
    );
    let id = s["id"].as_str().unwrap();
    assert_eq!(m.session(id).unwrap()["status"], "stopped");
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
    m.remove_stale();
    assert!(m.session(id).is_none(), "stale session removed");

    // Idle timeout.
    let s = m
        .begin(&a, json!({"type":"SoftwareSession","timeoutRequest":0.2}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    m.expire().await;
    let n = notes.recv().await.unwrap();
    assert!(
        n.message.ends_with("No activity over 0.2 seconds"),
        "{}",
        n.message
    );
    assert_eq!(
        m.session(s["id"].as_str().unwrap()).unwrap()["description"],
        "No activity over 0.2 seconds"
    );
}

#[tokio::test]
async fn dead_agent_restarts_then_fails() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |c| c.max_restarts = 1);
    let a = client("a");
    let mut notes = connect(&m, &a);
    let s = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    let id = s["id"].as_str().unwrap().to_string();
    let kill = |fake: &Fake| {
        let tx = fake
            .kills
            .lock()
            .unwrap()
            .get_mut(&id)
            .unwrap()
            .pop()
            .unwrap();
        tx.send(()).unwrap();
    };
    kill(&fake);
    let n = notes.recv().await.unwrap();
    assert_eq!(n.level, Level::Warn);
    assert_eq!(n.message, RESTARTING);
    let n = notes.recv().await.unwrap();
    assert!(n.message.starts_with("Session restarted"), "{}", n.message);
    let out = m
        .execute(&a, chunk("1"), Some(s.clone()), None)
        .await
        .unwrap();
    assert_eq!(out["outputs"], json!(["1"]), "works after restart");
    assert_eq!(fake.started.load(Ordering::SeqCst), 2);
    kill(&fake);
    let n = notes.recv().await.unwrap();
    assert_eq!(n.level, Level::Error);
    assert!(n.message.contains("died 2 times"), "{}", n.message);
    for _ in 0..100 {
        if m.session(&id).unwrap()["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(m.session(&id).unwrap()["status"], "failed");
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
    assert_eq!(m.free(), (4.0, 4.0));
}

#[tokio::test]
async fn start_failure_is_a_failed_session_and_releases() {
    let fake = Arc::new(Fake::default());
    fake.fail_start.store(true, Ordering::SeqCst);
    let m = manager(fake, |_| {});
    let s = m
        .begin(&client("a"), json!({"type":"SoftwareSession"}))
        .await
        .unwrap();
    assert_eq!(s["status"], "failed");
    assert!(s["description"].as_str().unwrap().contains("fake refuses"));
    assert_eq!(m.free(), (4.0, 4.0));
}

#[tokio::test]
async fn shutdown_ends_everything_and_refuses_new_sessions() {
    let fake = Arc::new(Fake::default());
    let m = manager(fake.clone(), |_| {});
    let a = client("a");
    let mut notes = connect(&m, &a);
    for _ in 0..3 {
        m.begin(&a, json!({"type":"SoftwareSession","cpuRequest":0.1}))
            .await
            .unwrap();
    }
    assert_eq!(fake.live.load(Ordering::SeqCst), 3);
    m.shutdown().await;
    assert_eq!(fake.live.load(Ordering::SeqCst), 0);
    assert_eq!(
        notes.recv().await.unwrap().message,
        "Server is shutting down."
    );
    let e = m
        .begin(&a, json!({"type":"SoftwareSession"}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), -32000);
}

#[tokio::test]
async fn mounts_outside_the_allow_list_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("ok");
    std::fs::create_dir(&allowed).unwrap();
    let fake = Arc::new(Fake::default());
    let m = manager(fake, |c| c.mount_allow = vec![allowed.clone()]);
    let a = client("a");
    let e = m
        .begin(&a, json!({"type":"SoftwareSession","volumeMounts":[{"type":"VolumeMount","mountSource":"/etc","mountDestination":"/data"}]}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), -32005);
    let e = m
        .begin(&a, json!({"type":"SoftwareSession","volumeMounts":[{"type":"VolumeMount","mountSource":format!("{}/../", allowed.display()),"mountDestination":"/data"}]}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), -32005, "no escape with ..");
    let s = m
        .begin(&a, json!({"type":"SoftwareSession","volumeMounts":[{"type":"VolumeMount","mountSource":allowed,"mountDestination":"/data"}]}))
        .await
        .unwrap();
    assert_eq!(s["status"], "started");
}
