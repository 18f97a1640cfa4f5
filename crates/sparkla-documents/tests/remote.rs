//! The remote executor against a real Sparkla server (in this process, on 127.0.0.1:0) over
//! the real sandbox runtime: begin, execute…, end over Executa WebSocket, JWT in the
//! subprotocol.

mod common;

use common::*;
use serde_json::{json, Value};
use sparkla_documents::{execute, Error, ExecuteOptions, Output, Progress, Session};
use sparkla_server::edge::jwt::{self, Jwt};
use sparkla_server::{manager_for, Config, Server};

const SECRET: &str = "documents test secret";

async fn server() -> Server {
    let mut config = Config {
        port: 0,
        jwt_secret: Some(SECRET.into()),
        runtime: "sandbox".into(),
        cpu_total: 4.0,
        memory_total: 4.0,
        ..Default::default()
    };
    config
        .session_defaults
        .insert("cpuRequest".into(), json!(0.5));
    config
        .session_defaults
        .insert("memoryRequest".into(), json!(0.5));
    let manager = manager_for(&config, runtime("remote", 8));
    Server::start(config, manager).await.expect("server starts")
}

fn remote(input: &std::path::Path, url: String, token: Option<String>) -> ExecuteOptions {
    let mut o = ExecuteOptions::new(
        input,
        Session::Remote {
            url,
            token,
            environment: None,
        },
    );
    o.progress = Progress::Never;
    o
}

#[tokio::test(flavor = "multi_thread")]
async fn executes_through_a_server_like_any_client() {
    if skip("executes_through_a_server_like_any_client") {
        return;
    }
    let server = server().await;
    let url = format!("ws://{}", server.addr());
    let token = Jwt::new(SECRET)
        .unwrap()
        .sign(&json!({"exp": jwt::now() + 600}));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("remote.ipynb");
    let nb = json!({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [
            {"cell_type": "code", "id": "a", "metadata": {}, "source": "n = 6\nprint('remote')", "outputs": [], "execution_count": null},
            {"cell_type": "code", "id": "b", "metadata": {}, "source": "n * 7", "outputs": [], "execution_count": null},
        ]
    });
    std::fs::write(&input, serde_json::to_vec(&nb).unwrap()).unwrap();
    let output = dir.path().join("out.ipynb");
    let mut opts = remote(&input, url.clone(), Some(token.clone()));
    opts.output = Output::File(output.clone());
    let report = execute(opts).await.expect("execute remotely");
    assert_eq!(report.runtime, "remote");
    assert_eq!(report.errors(), 0, "{report:?}");
    let out: Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    assert_eq!(out["cells"][0]["outputs"][0]["text"], json!(["remote\n"]));
    assert_eq!(
        out["cells"][1]["outputs"][0]["data"]["text/plain"],
        json!(["42"])
    );
    assert_eq!(out["metadata"]["sparkla"]["environment"]["server"], url);
    validate_notebook(&output);

    // And --check through the server reproduces it.
    let mut opts = remote(&output, url.clone(), Some(token));
    opts.check = true;
    let report = execute(opts).await.expect("check remotely");
    assert!(report.success(true), "{:?}", report.differing());

    // A bad token: a clear session error, nothing written.
    let mut opts = remote(&input, url, Some("not.a.jwt".into()));
    opts.output = Output::File(dir.path().join("never.ipynb"));
    match execute(opts).await {
        Err(Error::Session(m)) => assert!(m.contains("closed") || m.contains("4001"), "{m}"),
        other => panic!("expected a session error, got {other:?}"),
    }
    assert!(!dir.path().join("never.ipynb").exists());
    server.shutdown().await.unwrap();
    assert_no_leftovers("remote", 8).await;
}
