//! The server end to end: a real server on 127.0.0.1:0, the real runtime and agent, real
//! interpreters, a real WebSocket client (tokio-tungstenite) and raw HTTP.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// An old-style Executa client: JWT in the subprotocol (echoed), begin, execute python, end.
#[tokio::test(flavor = "multi_thread")]
async fn executa_client_session() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let t = token(json!({}));
    let mut c = connect(server.addr(), Via::Protocol(t.clone())).await;
    assert_eq!(
        c.protocol.as_deref(),
        Some(format!("executa.stenci.la+1+client1+{t}").as_str()),
        "the subprotocol is echoed in the 101"
    );
    let s = c.call("begin", json!({"node": session()})).await;
    assert_eq!(s["type"], "SoftwareSession");
    assert_eq!(s["status"], "started");
    assert!(s["id"].as_str().unwrap().starts_with("se"));
    assert!(s["name"].as_str().unwrap().contains('-'));
    assert_eq!(s["durationRequest"], 21600);
    assert!(s["dateStart"]["value"].as_str().unwrap().ends_with('Z'));
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "print('hi')\n6*7\n1/0"), "session": {"type":"SoftwareSession","id": s["id"]}}),
        )
        .await;
    assert_eq!(out["type"], "CodeChunk");
    assert_eq!(out["outputs"], json!(["hi\n", 42]), "{out}");
    assert_eq!(out["errors"][0]["errorType"], "ZeroDivisionError", "{out}");
    assert!(out["duration"].as_f64().is_some());
    // State persists between chunks.
    c.call(
        "execute",
        json!({"node": chunk("python", "x = 5"), "session": s}),
    )
    .await;
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "x * 2"), "session": s}),
        )
        .await;
    assert_eq!(out["outputs"], json!([10]));
    // Expressions too.
    let out = c
        .call(
            "execute",
            json!({"node": {"type":"CodeExpression","programmingLanguage":"python","text":"x + 1"}, "session": s}),
        )
        .await;
    assert_eq!(out["output"], 6, "{out}");
    let ended = c.call("end", json!({"node": s})).await;
    assert_eq!(ended["status"], "stopped");
    assert!(ended["dateEnd"].is_object());
    let n = c.notification().await;
    assert_eq!(n["method"], "info");
    assert_eq!(
        n["params"]["message"],
        format!("Ending session \"{}\".", s["name"].as_str().unwrap())
    );
    assert_no_descendants("after end").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_cases_on_websocket() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let addr = server.addr();
    let now = sparkla_server::edge::jwt::now();
    let other = sparkla_server::edge::jwt::Jwt::new("another secret").unwrap();
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg":"none","typ":"JWT"})),
        b64(json!({"admin":true}))
    );
    let refused: Vec<(&str, Via, &str)> = vec![
        ("none", Via::None, "JWT is required"),
        (
            "malformed",
            Via::Protocol("not-a-jwt".into()),
            "JWT is invalid",
        ),
        (
            "bad signature",
            Via::Bearer(other.sign(&json!({}))),
            "JWT signature is invalid",
        ),
        (
            "expired",
            Via::Query(token(json!({"exp": now - 3600}))),
            "JWT has expired",
        ),
        (
            "not yet valid",
            Via::Protocol(token(json!({"nbf": now + 3600}))),
            "JWT is not valid yet",
        ),
        ("alg none", Via::Protocol(alg_none), "JWT"),
    ];
    for (case, via, reason) in refused {
        let mut c = connect(addr, via).await;
        let (code, why) = c.closed().await;
        assert_eq!(code, 4001, "{case}: close code");
        assert!(why.starts_with(reason), "{case}: reason {why:?}");
    }
    for (case, via) in [
        ("subprotocol", Via::Protocol(token(json!({})))),
        ("bearer", Via::Bearer(token(json!({"exp": now + 60})))),
        ("query", Via::Query(token(json!({})))),
    ] {
        let mut c = connect(addr, via).await;
        let m = c.call("manifest", json!({})).await;
        assert_eq!(m["version"], 1, "{case}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn http_routes_and_jwt() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let addr = server.addr();
    let user = token(json!({}));
    let admin = token(json!({"admin": true}));
    let bearer = format!("Bearer {user}");
    let admin_bearer = format!("Bearer {admin}");
    let rpc = json!({"jsonrpc":"2.0","id":7,"method":"manifest"}).to_string();

    let unauthorized =
        r#"{"jsonrpc":"2.0","id":"","error":{"code":-32600,"message":"JWT verification failed"}}"#;
    let (status, body) = http(addr, "POST", "/", &[], &rpc).await;
    assert_eq!((status, body.as_str()), (401, unauthorized), "no token");
    let (status, body) = http(
        addr,
        "POST",
        "/",
        &[("Authorization", "Bearer x.y.z")],
        &rpc,
    )
    .await;
    assert_eq!((status, body.as_str()), (401, unauthorized), "bad token");

    let (status, body) = http(addr, "POST", "/", &[("Authorization", &bearer)], &rpc).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], 7);
    assert_eq!(v["result"]["version"], 1);
    assert!(v["result"]["addresses"]["ws"][0]
        .as_str()
        .unwrap()
        .starts_with("ws://127.0.0.1:"));
    assert_eq!(
        v["result"]["capabilities"]["begin"]["properties"]["node"]["properties"]["cpuRequest"]
            ["maximum"],
        8.0
    );

    let (status, body) = http(addr, "GET", &format!("/manifest?jwt={user}"), &[], "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["package"]["name"],
        "sparkla"
    );

    // Bare method routes: params in, bare result out.
    let (status, body) = http(
        addr,
        "POST",
        "/begin",
        &[("Authorization", &bearer)],
        &json!({"node": session()}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["status"], "started");
    let (status, body) = http(
        addr,
        "POST",
        "/execute",
        &[("Authorization", &bearer)],
        &json!({"node": chunk("bash", "echo $((6*7))"), "session": s}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        out["outputs"][0].as_str().map(str::trim),
        Some("42"),
        "{out}"
    );
    // Another token may not end it; the same token may.
    let other = format!("Bearer {}", token(json!({"sub": "someone-else"})));
    let (status, body) = http(
        addr,
        "POST",
        "/end",
        &[("Authorization", &other)],
        &json!({"node": s}).to_string(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        -32005
    );
    let (status, body) = http(addr, "POST", "/begin", &[("Authorization", &bearer)], "{").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        -32700
    );

    // /admin: 401 without token, 403 for users, JSON for admins.
    assert_eq!(http(addr, "GET", "/admin", &[], "").await.0, 401);
    assert_eq!(
        http(addr, "GET", "/admin", &[("Authorization", &bearer)], "")
            .await
            .0,
        403
    );
    let (status, body) = http(
        addr,
        "GET",
        "/admin",
        &[("Authorization", &admin_bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let a: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(a["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(a["sessions"][0]["status"], "started");
    assert_eq!(a["config"]["jwtSecret"], "(set, hidden)");

    let (status, body) = http(
        addr,
        "POST",
        "/end",
        &[("Authorization", &bearer)],
        &json!({"node": s}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "stopped"
    );

    // Open routes and unknown routes.
    let (status, body) = http(addr, "GET", "/health", &[], "").await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap()["status"].clone()
        ),
        (200, json!("ok"))
    );
    let (status, body) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    for metric in [
        "sparkla_sessions{",
        "sparkla_begin_seconds_bucket",
        "sparkla_execute_seconds_bucket",
        "sparkla_end_seconds_bucket",
        "sparkla_cpu_allocated",
        "sparkla_cpu_total",
        "sparkla_memory_allocated_gib",
        "sparkla_connections",
        "sparkla_pool_idle",
        "sparkla_errors_total{",
        "sparkla_process_peak_resident_bytes",
    ] {
        assert!(body.contains(metric), "/metrics lacks {metric}:\n{body}");
    }
    assert_eq!(
        http(addr, "GET", "/nope", &[("Authorization", &bearer)], "")
            .await
            .0,
        404
    );
    assert_no_descendants("after end over HTTP").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_code() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let mut a = connect_token(server.addr(), json!({})).await;
    let mut b = connect_token(server.addr(), json!({})).await;

    a.send_text("{not json".into()).await;
    let r = a.response("null").await;
    assert_eq!(r["error"]["code"], -32700);
    assert_eq!(r["id"], Value::Null);
    a.send_text(json!({"jsonrpc":"2.0","id":"x1","params":{}}).to_string())
        .await;
    assert_eq!(a.response("x1").await["error"]["code"], -32600);
    let r = a.call_raw("frobnicate", json!({})).await;
    assert_eq!(r["error"]["code"], -32601);
    assert_eq!(r["error"]["message"], "Method not found: \"frobnicate\"");
    let r = a.call_raw("begin", json!({})).await;
    assert_eq!(r["error"]["code"], -32602);
    assert_eq!(r["error"]["message"], "Invalid params: \"node\" is missing");
    let r = a
        .call_raw(
            "begin",
            json!({"node":{"type":"SoftwareSession","cpuRequest":"lots"}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32602);
    let r = a.call_raw("cancel", json!({"job": {"x":1}})).await;
    assert_eq!(r["error"]["code"], -32602);
    // Integer ids are echoed as integers.
    a.send_text(json!({"jsonrpc":"2.0","id":42,"method":"manifest"}).to_string())
        .await;
    assert_eq!(a.response("42").await["id"], 42);

    // Capability error: only the creator ends.
    let s = a.call("begin", json!({"node": session()})).await;
    let r = b.call_raw("end", json!({"node": s})).await;
    assert_eq!(r["error"]["code"], -32005, "{r}");
    // Failures inside a session come back in the node's errors.
    let out = a
        .call(
            "execute",
            json!({"node": chunk("python", "1"), "session": {"id": "bogus"}}),
        )
        .await;
    assert_eq!(
        out["errors"][0]["errorMessage"],
        "Session id is invalid: bogus"
    );
    let out = a
        .call("execute", json!({"node": chunk("python", "1"), "session": {"id": "se0123456789abcdef0123456789abcdef"}}))
        .await;
    assert_eq!(
        out["errors"][0]["errorMessage"],
        "Session is no longer available."
    );
    // Other nodes come back unchanged; decode/encode JSON.
    let p = json!({"type":"Paragraph","content":["x"]});
    assert_eq!(a.call("execute", json!({"node": p})).await, p);
    assert_eq!(
        a.call(
            "decode",
            json!({"content": "{\"a\":[1]}", "format": "json"})
        )
        .await,
        json!({"a":[1]})
    );
    assert_eq!(
        a.call("encode", json!({"node": {"a":1}})).await,
        json!("{\"a\":1}")
    );
    assert_eq!(
        a.call_raw("decode", json!({"content": "{", "format": "json"}))
            .await["error"]["code"],
        -32602
    );
    assert_eq!(
        a.call_raw("decode", json!({"content": "x", "format": "yaml"}))
            .await["error"]["code"],
        -32602
    );
    a.call("end", json!({"node": s})).await;
    let out = a
        .call(
            "execute",
            json!({"node": chunk("python", "1"), "session": s}),
        )
        .await;
    assert!(
        out["errors"][0]["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("Session is inactive."),
        "{out}"
    );
    // Server error: a begin that arrives while the server is shutting down.
    server.manager().shutdown().await;
    let r = a.call_raw("begin", json!({"node": session()})).await;
    assert_eq!(r["error"]["code"], -32000, "{r}");
    assert_eq!(r["error"]["message"], "Server is shutting down", "{r}");
    server.shutdown().await.unwrap();
}

/// Requests on one socket run concurrently: a quick one overtakes a slow one.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_on_one_socket() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let mut c = connect_token(server.addr(), json!({})).await;
    let s = c.call("begin", json!({"node": session()})).await;
    let slow = c
        .send(
            "execute",
            json!({"node": chunk("python", "import time\ntime.sleep(1.5)\n'slow'"), "session": s}),
        )
        .await;
    let quick = c.send("manifest", json!({})).await;
    // Read in arrival order: the quick response must come first.
    let first = loop {
        let v = c.call_raw_next().await;
        if v.get("id").is_some() {
            break v;
        }
    };
    assert_eq!(first["id"], quick.as_str());
    let r = c.response(&slow).await;
    assert_eq!(r["result"]["outputs"], json!(["slow"]));
    c.call("end", json!({"node": s})).await;
    server.shutdown().await.unwrap();
}

trait NextMessage {
    async fn call_raw_next(&mut self) -> Value;
}

impl NextMessage for Client {
    async fn call_raw_next(&mut self) -> Value {
        use futures_util::StreamExt;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_cap_requests_and_resources_are_accounted() {
    let _g = SERIAL.lock().await;
    let server = server(|c| {
        c.cpu_total = 1.0;
        c.memory_total = 2.0;
    })
    .await;
    let mut c = connect_token(
        server.addr(),
        json!({"session": {"cpuLimit": 0.25, "memoryLimit": 0.5}}),
    )
    .await;
    let s = c
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","cpuRequest":4,"memoryRequest":3}}),
        )
        .await;
    assert_eq!(s["status"], "started");
    assert_eq!(s["cpuRequest"], 0.25);
    assert_eq!(s["memoryRequest"], 0.5);
    // Without claims, a request over what is free fails.
    let mut d = connect_token(server.addr(), json!({})).await;
    let f = d
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","cpuRequest":1}}),
        )
        .await;
    assert_eq!(f["status"], "failed");
    assert_eq!(
        f["description"],
        "Insufficient resources available to begin session"
    );
    let m = d.call("manifest", json!({})).await;
    assert_eq!(
        m["capabilities"]["begin"]["properties"]["node"]["properties"]["cpuRequest"]["maximum"],
        0.75
    );
    c.call("end", json!({"node": s})).await;
    let ok = d
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","cpuRequest":1}}),
        )
        .await;
    assert_eq!(ok["status"], "started", "resources released by end");
    d.call("end", json!({"node": ok})).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_limit_and_ownership_of_end() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let addr = server.addr();
    let mut a = connect_token(addr, json!({})).await;
    let mut b = connect_token(addr, json!({})).await;
    let mut c = connect_token(addr, json!({})).await;
    let mut admin = connect_token(addr, json!({"admin": true})).await;
    let s = a
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","clientsLimit":2}}),
        )
        .await;
    let out = b
        .call(
            "execute",
            json!({"node": chunk("bash", "echo joined"), "session": {"id": s["id"]}}),
        )
        .await;
    assert!(out["errors"].is_null(), "b joins by id: {out}");
    let out = c
        .call(
            "execute",
            json!({"node": chunk("bash", "echo no"), "session": {"id": s["id"]}}),
        )
        .await;
    assert_eq!(
        out["errors"][0]["errorMessage"],
        "Maximum number of clients already using this session"
    );
    assert_eq!(
        b.call_raw("end", json!({"node": s})).await["error"]["code"],
        -32005
    );
    let ended = admin.call("end", json!({"node": s})).await;
    assert_eq!(ended["status"], "stopped", "an admin may end any session");
    // Both clients of the session were told.
    for cl in [&mut a, &mut b] {
        let n = cl.notification().await;
        assert!(
            n["params"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Ending session"),
            "{n}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnect_ends_sessions_but_not_admin_ones() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let addr = server.addr();
    let mut a = connect_token(addr, json!({})).await;
    let s = a.call("begin", json!({"node": session()})).await;
    // And an implicit session.
    let out = a
        .call("execute", json!({"node": chunk("python", "2+2")}))
        .await;
    assert_eq!(out["outputs"], json!([4]));
    let mut adm = connect_token(addr, json!({"admin": true})).await;
    let sa = adm.call("begin", json!({"node": session()})).await;
    assert_eq!(server.manager().list().len(), 3);
    drop(a);
    let m = server.manager().clone();
    let id = s["id"].as_str().unwrap().to_string();
    eventually("sessions of the disconnected client end", || {
        m.list()
            .iter()
            .filter(|x| x.status.as_str() == "stopped")
            .count()
            == 2
    })
    .await;
    assert_eq!(m.session(&id).unwrap()["status"], "stopped");
    drop(adm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        m.session(sa["id"].as_str().unwrap()).unwrap()["status"],
        "started",
        "an admin's session survives"
    );
    server.shutdown().await.unwrap();
    assert_no_descendants("after shutdown").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_with_short_intervals() {
    let _g = SERIAL.lock().await;
    let server = server(|c| {
        c.expiry_interval = 0.2;
        c.duration_warning = 100.0;
        c.timeout_warning = 100.0;
        c.stale_interval = 0.2;
        c.stale_period = 1.0;
    })
    .await;
    let mut c = connect_token(server.addr(), json!({})).await;
    let s = c
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","durationRequest":1.5}}),
        )
        .await;
    let n = c.notification().await;
    assert_eq!(n["method"], "warn");
    assert_eq!(
        n["params"]["message"],
        "Session will reach maximum duration in 0 minutes"
    );
    let n = c.notification().await;
    assert_eq!(n["method"], "info", "{n}");
    assert_eq!(
        n["params"]["message"],
        format!(
            "Ending session \"{}\". Reached maximum duration of 1.5 seconds",
            s["name"].as_str().unwrap()
        )
    );
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "1"), "session": s}),
        )
        .await;
    assert_eq!(
        out["errors"][0]["errorMessage"],
        "Session is inactive. Reached maximum duration of 1.5 seconds"
    );
    // Stale sessions are removed after stalePeriod.
    let m = server.manager().clone();
    let id = s["id"].as_str().unwrap().to_string();
    eventually("stale session removed", || m.session(&id).is_none()).await;

    // Inactivity: warned, then ended.
    let s = c
        .call(
            "begin",
            json!({"node": {"type":"SoftwareSession","timeoutRequest":1}}),
        )
        .await;
    let n = c.notification().await;
    assert_eq!(
        n["params"]["message"],
        "Session will end due to inactivity in 0 minutes"
    );
    let n = c.notification().await;
    assert_eq!(
        n["params"]["message"],
        format!(
            "Ending session \"{}\". No activity over 1 seconds",
            s["name"].as_str().unwrap()
        )
    );
    assert_no_descendants("after expiry").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_interrupts_an_execution() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let mut c = connect_token(server.addr(), json!({})).await;
    let s = c.call("begin", json!({"node": session()})).await;
    assert_eq!(
        c.call("cancel", json!({"job": "nothing"})).await,
        json!(false)
    );
    let t0 = Instant::now();
    let run = c
        .send("execute", json!({"node": chunk("python", "import time\ntime.sleep(60)"), "session": s, "job": "j1"}))
        .await;
    // Cancel as soon as it is running.
    let mut cancelled = false;
    for _ in 0..100 {
        if c.call("cancel", json!({"job": "j1"})).await == json!(true) {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cancelled, "cancel found the job");
    let r = c.response(&run).await;
    let err = &r["result"]["errors"][0];
    assert!(
        err["cancelled"] == true
            || err["errorType"] == "Cancelled"
            || err["errorType"] == "KeyboardInterrupt",
        "a cancellation CodeError: {r}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "interrupted, not finished"
    );
    // The session still works.
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "'after'"), "session": s}),
        )
        .await;
    assert_eq!(out["outputs"], json!(["after"]));
    c.call("end", json!({"node": s})).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn message_size_and_connection_limits() {
    let _g = SERIAL.lock().await;
    let server = server(|c| {
        c.max_message_size = 4096;
        c.max_connections = 2;
    })
    .await;
    let addr = server.addr();
    let mut a = connect_token(addr, json!({})).await;
    let big =
        json!({"jsonrpc":"2.0","id":1,"method":"decode","params":{"content":"x".repeat(10_000)}})
            .to_string();
    a.send_text(big.clone()).await;
    let (code, _) = a.closed().await;
    assert_eq!(code, 1009, "oversized message closes with 1009");
    let (status, _) = http(
        addr,
        "POST",
        "/",
        &[("Authorization", &format!("Bearer {}", token(json!({}))))],
        &big,
    )
    .await;
    assert_eq!(status, 413);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = connect_token(addr, json!({})).await;
    let mut c = connect_token(addr, json!({})).await;
    assert_eq!(b.call("manifest", json!({})).await["version"], 1);
    assert_eq!(c.call("manifest", json!({})).await["version"], 1);
    let mut d = connect_token(addr, json!({})).await;
    assert_eq!(d.closed().await.0, 1013, "over max connections");
    assert_eq!(
        b.call("manifest", json!({})).await["version"],
        1,
        "others unaffected"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_leaves_nothing_behind() {
    let _g = SERIAL.lock().await;
    let server = server(|_| {}).await;
    let addr = server.addr();
    let mut c = connect_token(addr, json!({})).await;
    let s1 = c.call("begin", json!({"node": session()})).await;
    let s2 = c.call("begin", json!({"node": session()})).await;
    c.call(
        "execute",
        json!({"node": chunk("python", "1"), "session": s1}),
    )
    .await;
    c.call(
        "execute",
        json!({"node": chunk("bash", "sleep 100 &"), "session": s2}),
    )
    .await;
    assert!(
        !descendants().is_empty(),
        "sessions run as processes below the server"
    );
    server.shutdown().await.unwrap();
    let (code, reason) = c.closed().await;
    assert_eq!((code, reason.as_str()), (1001, "Server is shutting down"));
    let messages: Vec<String> = c
        .notifications
        .iter()
        .map(|n| {
            n["params"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        messages.iter().any(|m| m == "Server is shutting down."),
        "{messages:?}"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| m.starts_with("Ending session"))
            .count(),
        2,
        "{messages:?}"
    );
    assert_no_descendants("after shutdown").await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

/// The agent of a session is killed from outside: the client is warned, the session restarts
/// (state lost, stated) and works again; after `maxRestarts` it fails with a reason.
#[tokio::test(flavor = "multi_thread")]
async fn agent_death_restarts_then_fails() {
    let _g = SERIAL.lock().await;
    let server = server(|c| c.max_restarts = 1).await;
    let mut c = connect_token(server.addr(), json!({})).await;
    let s = c.call("begin", json!({"node": session()})).await;
    let kill_agent = || {
        let agents: Vec<i32> = descendants()
            .into_iter()
            .filter(|(_, name)| name == "agent" || name.starts_with("sparkla-agent"))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(agents.len(), 1, "one agent: {:?}", descendants());
        // SAFETY: plain syscall on a process this test owns.
        unsafe { libc::kill(agents[0], libc::SIGKILL) };
    };
    c.call(
        "execute",
        json!({"node": chunk("python", "x = 1"), "session": s}),
    )
    .await;
    kill_agent();
    let n = c.notification().await;
    assert_eq!(
        (n["method"].as_str(), n["params"]["message"].as_str()),
        (Some("warn"), Some("Session failed and will be restarted"))
    );
    let n = c.notification().await;
    assert!(
        n["params"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Session restarted"),
        "{n}"
    );
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "'back'"), "session": s}),
        )
        .await;
    assert_eq!(out["outputs"], json!(["back"]), "works after the restart");
    kill_agent();
    let n = c.notification().await;
    assert_eq!(n["method"], "error", "{n}");
    assert!(
        n["params"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Session failed"),
        "{n}"
    );
    let m = server.manager().clone();
    let id = s["id"].as_str().unwrap().to_string();
    eventually("session failed", || {
        m.session(&id).unwrap()["status"] == "failed"
    })
    .await;
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "1"), "session": s}),
        )
        .await;
    assert!(
        out["errors"][0]["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("Session is inactive. Session failed"),
        "{out}"
    );
    assert_no_descendants("after failure").await;
    server.shutdown().await.unwrap();
}

/// With a warm pool, sessions come from it (their limits applied at hand-out), the pool
/// refills, and shutdown reclaims the idle instances too.
#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_serves_sessions_and_is_reclaimed() {
    let _g = SERIAL.lock().await;
    let server = server(|c| c.pool_size = 2).await;
    let m = server.manager().clone();
    eventually("pool filled", || m.pool_idle() == 2).await;
    let mut c = connect_token(server.addr(), json!({})).await;
    let s = c.call("begin", json!({"node": session()})).await;
    assert_eq!(s["status"], "started");
    let out = c
        .call(
            "execute",
            json!({"node": chunk("python", "6*7"), "session": s}),
        )
        .await;
    assert_eq!(out["outputs"], json!([42]));
    eventually("pool refilled", || m.pool_idle() == 2).await;
    c.call("end", json!({"node": s})).await;
    server.shutdown().await.unwrap();
    assert_no_descendants("after shutdown with a pool").await;
}

/// The same Executa session on the Docker runtime, when the engine and the default image
/// are there (CI builds the image); otherwise SKIPPED, loudly.
#[tokio::test(flavor = "multi_thread")]
async fn docker_runtime_session() {
    let _g = SERIAL.lock().await;
    let c = config(|c| c.runtime = "docker".into());
    let runtime = match sparkla_server::runtime_for(&c).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIPPED: docker_runtime_session: the Docker runtime is unavailable: {e:#}");
            return;
        }
    };
    if let Err(e) = runtime.prepare(None).await {
        eprintln!("SKIPPED: docker_runtime_session: the default session image is missing ({e}); build it with scripts/build-docker-env.sh");
        return;
    }
    let server = sparkla_server::Server::start(c.clone(), sparkla_server::manager_for(&c, runtime))
        .await
        .unwrap();
    let mut cl = connect_token(server.addr(), json!({})).await;
    let s = cl.call("begin", json!({"node": session()})).await;
    assert_eq!(s["status"], "started", "{s}");
    let out = cl
        .call(
            "execute",
            json!({"node": chunk("python", "print('hi')\n6*7"), "session": s}),
        )
        .await;
    assert_eq!(out["outputs"], json!(["hi\n", 42]), "{out}");
    let ended = cl.call("end", json!({"node": s})).await;
    assert_eq!(ended["status"], "stopped");
    server.shutdown().await.unwrap();
}
