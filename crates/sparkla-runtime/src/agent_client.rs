//! The host's side of the agent protocol (`sparkla_protocol::agent`): newline-delimited
//! JSON-RPC over any byte stream, with responses matched to requests and streamed `output`
//! notifications routed to the job that produced them.

use serde_json::{json, Value};
use sparkla_protocol::agent::{self, method, Output, Ready};
use sparkla_protocol::jsonrpc::{ErrorObject, Id, Request, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{BoxRead, BoxWrite};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The stream closed: the agent exited or its instance died.
    #[error("the session's agent is gone ({0})")]
    Closed(String),
    /// The agent answered with a JSON-RPC error.
    #[error("the session's agent refused the request: {0}")]
    Rpc(ErrorObject),
    /// The agent did not get ready in time, or said something unreadable.
    #[error("the session's agent misbehaved: {0}")]
    Protocol(String),
}

type Pending = HashMap<u64, oneshot::Sender<Response>>;

struct Shared {
    pending: Mutex<Pending>,
    jobs: Mutex<HashMap<String, mpsc::UnboundedSender<Output>>>,
}

/// A connection to one agent. Cheap to share behind an `Arc`; requests may be concurrent.
pub struct AgentClient {
    writer: tokio::sync::Mutex<BoxWrite>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    ready: watch::Receiver<Option<Ready>>,
    closed: watch::Receiver<Option<String>>,
    logs: Mutex<Option<mpsc::UnboundedReceiver<agent::Log>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl AgentClient {
    /// Start reading from the agent. Use [`AgentClient::ready`] to wait for its `ready`.
    pub fn new(read: BoxRead, write: BoxWrite) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
        });
        let (ready_tx, ready) = watch::channel(None);
        let (closed_tx, closed) = watch::channel(None);
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, shared.clone(), ready_tx, closed_tx, log_tx));
        Self {
            writer: tokio::sync::Mutex::new(write),
            shared,
            next_id: AtomicU64::new(1),
            ready,
            closed,
            logs: Mutex::new(Some(log_rx)),
            reader,
        }
    }

    /// Wait for the agent's `ready` notification (or its death).
    pub async fn ready(&self) -> Result<Ready, AgentError> {
        let mut ready = self.ready.clone();
        let mut closed = self.closed.clone();
        loop {
            if let Some(r) = ready.borrow().clone() {
                return Ok(r);
            }
            if let Some(reason) = closed.borrow().clone() {
                return Err(AgentError::Closed(reason));
            }
            tokio::select! {
                r = ready.changed() => if r.is_err() { return Err(AgentError::Closed("reader ended".into())) },
                _ = closed.changed() => {}
            }
        }
    }

    /// The `ready` notification, if it has arrived.
    pub fn ready_info(&self) -> Option<Ready> {
        self.ready.borrow().clone()
    }

    /// Resolves when the stream to the agent closes, with the reason.
    pub async fn closed(&self) -> String {
        let mut closed = self.closed.clone();
        loop {
            if let Some(reason) = closed.borrow().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return "reader ended".into();
            }
        }
    }

    /// Whether the stream is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// The agent's `log` notifications; can be taken once.
    pub fn take_logs(&self) -> Option<mpsc::UnboundedReceiver<agent::Log>> {
        self.logs.lock().expect("logs lock").take()
    }

    /// Send a request and wait for its response.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .insert(id, tx);
        let mut line = serde_json::to_vec(&Request::new(id, method, params))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let written = {
            let mut w = self.writer.lock().await;
            match w.write_all(&line).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            self.shared
                .pending
                .lock()
                .expect("pending lock")
                .remove(&id);
            return Err(AgentError::Closed(format!("write failed: {e}")));
        }
        let mut closed = self.closed.clone();
        tokio::select! {
            r = rx => match r {
                Ok(resp) => resp.into_result().map_err(AgentError::Rpc),
                Err(_) => Err(AgentError::Closed(self.closed.borrow().clone().unwrap_or_else(|| "stream closed".into()))),
            },
            reason = async { loop {
                if let Some(r) = closed.borrow().clone() { break r; }
                if closed.changed().await.is_err() { break "reader ended".to_string(); }
            }} => {
                self.shared.pending.lock().expect("pending lock").remove(&id);
                Err(AgentError::Closed(reason))
            }
        }
    }

    /// Execute a node (CodeChunk or CodeExpression) as `job`, streaming its output to
    /// `outputs` as it is produced. Returns the node with outputs, errors and duration.
    pub async fn execute(
        &self,
        job: &str,
        node: Value,
        outputs: Option<mpsc::UnboundedSender<Output>>,
    ) -> Result<Value, AgentError> {
        if let Some(tx) = outputs {
            self.shared
                .jobs
                .lock()
                .expect("jobs lock")
                .insert(job.to_string(), tx);
        }
        let result = self
            .call(method::EXECUTE, json!({"job": job, "node": node}))
            .await;
        self.shared.jobs.lock().expect("jobs lock").remove(job);
        result
    }

    /// Cancel a job. `Ok(true)` if it was running or queued.
    pub async fn cancel(&self, job: &str) -> Result<bool, AgentError> {
        let v = self.call(method::CANCEL, json!({ "job": job })).await?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// Start the kernels of these languages ahead of use.
    pub async fn warmup(&self, languages: &[&str]) -> Result<Value, AgentError> {
        self.call(method::WARMUP, json!({ "languages": languages }))
            .await
    }

    /// Ask the agent to stop its kernels and exit.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.call(method::SHUTDOWN, json!({})).await.map(|_| ())
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    read: BoxRead,
    shared: Arc<Shared>,
    ready: watch::Sender<Option<Ready>>,
    closed: watch::Sender<Option<String>>,
    logs: mpsc::UnboundedSender<agent::Log>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut line = Vec::new();
    let reason = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => break "the agent closed its stream".to_string(),
            Ok(_) => {}
            Err(e) => break format!("reading from the agent failed: {e}"),
        }
        let value: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable line from agent");
                continue;
            }
        };
        if value.get("method").is_some() {
            let method = value["method"].as_str().unwrap_or_default();
            let params = value.get("params").cloned().unwrap_or(Value::Null);
            match method {
                method::OUTPUT => {
                    if let Ok(out) = serde_json::from_value::<Output>(params) {
                        let jobs = shared.jobs.lock().expect("jobs lock");
                        if let Some(tx) = jobs.get(&out.job) {
                            let _ = tx.send(out);
                        }
                    }
                }
                method::READY => {
                    if let Ok(r) = serde_json::from_value::<Ready>(params) {
                        let _ = ready.send(Some(r));
                    }
                }
                method::LOG => {
                    if let Ok(l) = serde_json::from_value::<agent::Log>(params) {
                        let _ = logs.send(l);
                    }
                }
                other => tracing::debug!(method = other, "ignored notification from agent"),
            }
            continue;
        }
        match serde_json::from_value::<Response>(value) {
            Ok(resp) => {
                let id = match &resp.id {
                    Id::Num(n) => n.as_u64(),
                    _ => None,
                };
                let tx = id.and_then(|id| shared.pending.lock().expect("pending lock").remove(&id));
                match tx {
                    Some(tx) => {
                        let _ = tx.send(resp);
                    }
                    None => tracing::warn!(id = %resp.id, "response from agent for no request"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable message from agent"),
        }
    };
    let _ = closed.send(Some(reason));
    shared.pending.lock().expect("pending lock").clear();
    shared.jobs.lock().expect("jobs lock").clear();
}
