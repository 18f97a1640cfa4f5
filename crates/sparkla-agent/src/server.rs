//! The agent's request loop: reads newline-delimited JSON-RPC requests from the host,
//! hands executions to one worker thread per language (each owning that language's
//! kernel), and writes responses and streamed `output` notifications back.

use crate::kernel::{self, Event, Kernel, Outcome};
use crate::languages::Lang;
use crate::sys;
use serde::Serialize;
use serde_json::{json, Value};
use sparkla_protocol::agent::{
    method, AgentStatus, CancelParams, ExecuteParams, KernelStatus, LanguageInfo, Output, Ready,
    Stream, WarmupParams,
};
use sparkla_protocol::jsonrpc::{ErrorObject, Id, Notification, Request, Response};
use sparkla_protocol::CodeError;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where messages to the host go. Replaceable, so that a socket transport can take a new
/// connection while kernels (and their state) live on.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<Box<dyn Write + Send>>>);

impl Writer {
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Writer(Arc::new(Mutex::new(w)))
    }

    pub fn replace(&self, w: Box<dyn Write + Send>) {
        *self.0.lock().expect("writer lock") = w;
    }

    fn send(&self, msg: &impl Serialize) {
        let mut line = match serde_json::to_vec(msg) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut w = self.0.lock().expect("writer lock");
        // A host that has gone away is noticed by the reader (end of input).
        let _ = w.write_all(&line).and_then(|_| w.flush());
    }

    fn notify(&self, method: &str, params: impl Serialize) {
        if let Ok(p) = serde_json::to_value(params) {
            self.send(&Notification::new(method, p));
        }
    }
}

/// The state of one job, shared by its worker and `cancel`.
#[derive(Default)]
struct JobState {
    cancelled: AtomicBool,
    /// The process group of the kernel running it; 0 while queued.
    pgid: AtomicI32,
    done: AtomicBool,
}

enum Work {
    Execute {
        id: Id,
        job: String,
        node: Value,
        expression: bool,
        output_limit: usize,
        state: Arc<JobState>,
    },
    Warmup(mpsc::Sender<Result<(), String>>),
}

pub struct Agent {
    out: Writer,
    languages: Vec<(Lang, Option<std::path::PathBuf>)>,
    workers: Mutex<HashMap<Lang, mpsc::Sender<Work>>>,
    jobs: Arc<Mutex<HashMap<String, Arc<JobState>>>>,
    kernels: Arc<Mutex<HashMap<Lang, KernelStatus>>>,
    next_job: AtomicU64,
    next_cell: Arc<AtomicU64>,
    output_limit: usize,
}

impl Agent {
    pub fn new(out: Writer, output_limit: usize) -> Arc<Agent> {
        let languages = Lang::ALL.iter().map(|&l| (l, l.interpreter())).collect();
        Arc::new(Agent {
            out,
            languages,
            workers: Mutex::new(HashMap::new()),
            jobs: Arc::new(Mutex::new(HashMap::new())),
            kernels: Arc::new(Mutex::new(HashMap::new())),
            next_job: AtomicU64::new(1),
            next_cell: Arc::new(AtomicU64::new(1)),
            output_limit,
        })
    }

    fn available(&self) -> Vec<LanguageInfo> {
        self.languages
            .iter()
            .filter_map(|(l, p)| {
                p.as_ref().map(|p| LanguageInfo {
                    name: l.name().to_string(),
                    interpreter: Some(p.display().to_string()),
                })
            })
            .collect()
    }

    pub fn announce(&self) {
        self.out.notify(
            method::READY,
            Ready {
                version: sparkla_protocol::VERSION.to_string(),
                pid: std::process::id(),
                languages: self.available(),
            },
        );
    }

    /// Serve requests from `input` until it ends. Returns whether a shutdown was asked for.
    pub fn serve(self: &Arc<Self>, input: &mut dyn BufRead, max_line: usize) -> bool {
        let mut line = Vec::with_capacity(4096);
        loop {
            line.clear();
            match read_line(input, &mut line, max_line) {
                Ok(LineRead::Eof) => return false,
                Ok(LineRead::TooLong(n)) => self.out.send(&Response::err(
                    Id::Null,
                    ErrorObject::invalid_request(format!(
                        "message of {n} bytes or more exceeds the limit of {max_line} bytes"
                    )),
                )),
                Ok(LineRead::Line) => {
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    if self.handle(&text) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Handle one message; true when it was `shutdown`.
    fn handle(self: &Arc<Self>, text: &str) -> bool {
        let req = match Request::parse(text) {
            Ok(r) => r,
            Err((id, e)) => {
                self.out.send(&Response::err(id, e));
                return false;
            }
        };
        let Some(id) = req.id.clone() else {
            return false; // notifications from the host carry nothing we act on
        };
        let reply = |r: Result<Value, ErrorObject>| match r {
            Ok(v) => self.out.send(&Response::ok(id.clone(), v)),
            Err(e) => self.out.send(&Response::err(id.clone(), e)),
        };
        match req.method.as_str() {
            method::EXECUTE => {
                if let Err(e) = self.execute(id.clone(), &req) {
                    reply(Err(e));
                }
            }
            method::CANCEL => reply(self.cancel(&req)),
            method::STATUS => reply(Ok(self.status())),
            method::WARMUP => {
                let this = self.clone();
                std::thread::spawn(move || {
                    let r = this.warmup(&req);
                    match r {
                        Ok(v) => this.out.send(&Response::ok(id, v)),
                        Err(e) => this.out.send(&Response::err(id, e)),
                    }
                });
            }
            method::SHUTDOWN => {
                self.shutdown();
                reply(Ok(Value::Bool(true)));
                return true;
            }
            other => reply(Err(ErrorObject::method_not_found(other))),
        }
        false
    }

    fn params<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, ErrorObject> {
        serde_json::from_value(req.params.clone().unwrap_or_else(|| json!({})))
            .map_err(ErrorObject::invalid_params)
    }

    fn execute(self: &Arc<Self>, id: Id, req: &Request) -> Result<(), ErrorObject> {
        if req.param("node", 0).is_none() {
            return Err(ErrorObject::invalid_params("\"node\" is missing"));
        }
        let params: ExecuteParams = Self::params(req)?;
        let node = params.node;
        let expression = match sparkla_protocol::nodes::node_type(&node) {
            Some("CodeChunk") => false,
            Some("CodeExpression") => true,
            _ => {
                // Only code runs; anything else comes back unchanged.
                self.out.send(&Response::ok(id, node));
                return Ok(());
            }
        };
        let language = node
            .get("programmingLanguage")
            .and_then(Value::as_str)
            .unwrap_or("");
        let lang = match Lang::from_name(language) {
            Some(l) if self.languages.iter().any(|(x, p)| *x == l && p.is_some()) => l,
            _ => {
                let available: Vec<String> = self.available().into_iter().map(|l| l.name).collect();
                let message = if language.is_empty() {
                    format!(
                        "The code has no programmingLanguage; available languages: {}",
                        available.join(", ")
                    )
                } else {
                    format!(
                        "Unknown or unavailable programming language \"{language}\"; available languages: {}",
                        available.join(", ")
                    )
                };
                let err = CodeError::new("UnknownLanguage", message);
                let result = finish(node, expression, Vec::new(), vec![err], 0.0);
                self.out.send(&Response::ok(id, result));
                return Ok(());
            }
        };
        let job = params
            .job
            .unwrap_or_else(|| format!("job-{}", self.next_job.fetch_add(1, Ordering::Relaxed)));
        let state = Arc::new(JobState::default());
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            if jobs.contains_key(&job) {
                return Err(ErrorObject::invalid_params(format!(
                    "job \"{job}\" is already running"
                )));
            }
            jobs.insert(job.clone(), state.clone());
        }
        let work = Work::Execute {
            id,
            job,
            node,
            expression,
            output_limit: params.output_limit.unwrap_or(self.output_limit),
            state,
        };
        self.worker(lang)
            .send(work)
            .map_err(|_| ErrorObject::server_error("the kernel worker is gone"))
    }

    fn worker(self: &Arc<Self>, lang: Lang) -> mpsc::Sender<Work> {
        let mut workers = self.workers.lock().expect("workers lock");
        workers
            .entry(lang)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel();
                let worker = Worker {
                    lang,
                    kernel: None,
                    lost: None,
                    out: self.out.clone(),
                    jobs: self.jobs.clone(),
                    kernels: self.kernels.clone(),
                    cells: self.next_cell.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("kernel-{}", lang.name()))
                    .spawn(move || worker.run(rx))
                    .expect("spawn worker thread");
                tx
            })
            .clone()
    }

    fn cancel(&self, req: &Request) -> Result<Value, ErrorObject> {
        let CancelParams { job } = Self::params(req)?;
        let state = self.jobs.lock().expect("jobs lock").get(&job).cloned();
        let Some(state) = state else {
            return Ok(Value::Bool(false));
        };
        state.cancelled.store(true, Ordering::SeqCst);
        interrupt(state);
        Ok(Value::Bool(true))
    }

    fn warmup(self: &Arc<Self>, req: &Request) -> Result<Value, ErrorObject> {
        let WarmupParams { languages } = Self::params(req)?;
        let mut result = serde_json::Map::new();
        let mut waits = Vec::new();
        for name in languages {
            match Lang::from_name(&name) {
                Some(l) if self.languages.iter().any(|(x, p)| *x == l && p.is_some()) => {
                    let (tx, rx) = mpsc::channel();
                    let _ = self.worker(l).send(Work::Warmup(tx));
                    waits.push((name, rx));
                }
                _ => {
                    result.insert(
                        name.clone(),
                        format!("unknown or unavailable language \"{name}\"").into(),
                    );
                }
            }
        }
        for (name, rx) in waits {
            let r = rx.recv().unwrap_or_else(|_| Err("worker gone".into()));
            result.insert(name, r.err().map(Value::from).unwrap_or(Value::Null));
        }
        Ok(Value::Object(result))
    }

    fn status(&self) -> Value {
        let status = AgentStatus {
            version: sparkla_protocol::VERSION.to_string(),
            pid: std::process::id(),
            languages: self.available(),
            kernels: self
                .kernels
                .lock()
                .expect("kernels lock")
                .values()
                .cloned()
                .collect(),
            jobs: self
                .jobs
                .lock()
                .expect("jobs lock")
                .keys()
                .cloned()
                .collect(),
        };
        serde_json::to_value(status).unwrap_or(Value::Null)
    }

    /// Wait until no job is running or queued (used when the host closes its end: it may
    /// still be reading the results).
    /// Stops early when the host has closed its reading end too (it is gone: nobody wants
    /// the results, and a busy kernel must not keep the session alive).
    pub fn drain(&self, output_fd: std::os::fd::RawFd) {
        while !self.jobs.lock().expect("jobs lock").is_empty() {
            if sys::peer_gone(output_fd) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kill every kernel (and its process group).
    pub fn shutdown(&self) {
        for k in self.kernels.lock().expect("kernels lock").values() {
            sys::kill_group(k.pid as i32, libc::SIGKILL);
        }
    }
}

/// Interrupt a cancelled job if it is running: SIGINT to its kernel's process group, then
/// SIGTERM and SIGKILL two seconds apart if it has not finished (a busy loop in C code, a
/// signal the code traps).
fn interrupt(state: Arc<JobState>) {
    let pgid = state.pgid.load(Ordering::SeqCst);
    if pgid <= 0 {
        return; // queued or starting: the worker checks `cancelled` before running it
    }
    sys::kill_group(pgid, libc::SIGINT);
    std::thread::spawn(move || {
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            std::thread::sleep(Duration::from_secs(2));
            if state.done.load(Ordering::SeqCst) || state.pgid.load(Ordering::SeqCst) != pgid {
                return;
            }
            sys::kill_group(pgid, signal);
        }
    });
}

struct Worker {
    lang: Lang,
    kernel: Option<Kernel>,
    /// Why the previous kernel was lost, to be said when the next one starts.
    lost: Option<String>,
    out: Writer,
    jobs: Arc<Mutex<HashMap<String, Arc<JobState>>>>,
    kernels: Arc<Mutex<HashMap<Lang, KernelStatus>>>,
    cells: Arc<AtomicU64>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Work>) {
        for work in rx {
            match work {
                Work::Warmup(reply) => {
                    let _ = reply.send(self.kernel().map(|_| ()));
                }
                Work::Execute {
                    id,
                    job,
                    node,
                    expression,
                    output_limit,
                    state,
                } => {
                    let result = self.execute(&job, node, expression, output_limit, &state);
                    state.done.store(true, Ordering::SeqCst);
                    self.jobs.lock().expect("jobs lock").remove(&job);
                    self.out.send(&Response::ok(id, result));
                }
            }
        }
    }

    fn kernel(&mut self) -> Result<&mut Kernel, String> {
        if self.kernel.is_none() {
            let k = Kernel::start(self.lang)?;
            self.kernels.lock().expect("kernels lock").insert(
                self.lang,
                KernelStatus {
                    language: self.lang.name().into(),
                    pid: k.pid as u32,
                    executions: 0,
                },
            );
            if let Some(why) = self.lost.take() {
                self.out.notify(
                    method::LOG,
                    json!({"level": "warn", "message": format!(
                        "Started a fresh {} kernel; the previous one {why}, and its state was lost.",
                        self.lang.name())}),
                );
            }
            self.kernel = Some(k);
        }
        Ok(self.kernel.as_mut().expect("kernel"))
    }

    fn execute(
        &mut self,
        job: &str,
        node: Value,
        expression: bool,
        limit: usize,
        state: &Arc<JobState>,
    ) -> Value {
        let started = Instant::now();
        let lang = self.lang.name();
        if state.cancelled.load(Ordering::SeqCst) {
            let err = CodeError::new(
                "Cancelled",
                format!("Job \"{job}\" was cancelled before it started"),
            );
            return finish(node, expression, Vec::new(), vec![err], 0.0);
        }
        let code = node
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let cell = self.cells.fetch_add(1, Ordering::Relaxed);
        let mut collector = Collector::new(job, limit, self.out.clone());
        let outcome = {
            let kernel = match self.kernel() {
                Ok(k) => k,
                Err(e) => {
                    let err = CodeError::new("KernelError", e);
                    return finish(
                        node,
                        expression,
                        Vec::new(),
                        vec![err],
                        started.elapsed().as_secs_f64(),
                    );
                }
            };
            if state.cancelled.load(Ordering::SeqCst) {
                // Cancelled while its kernel was starting.
                let err = CodeError::new(
                    "Cancelled",
                    format!("Job \"{job}\" was cancelled before it started"),
                );
                return finish(
                    node,
                    expression,
                    Vec::new(),
                    vec![err],
                    started.elapsed().as_secs_f64(),
                );
            }
            state.pgid.store(kernel.pid, Ordering::SeqCst);
            if state.cancelled.load(Ordering::SeqCst) {
                interrupt(state.clone()); // cancelled between the check above and now
            }
            let req = kernel::Request {
                code: &code,
                expression,
                cell,
            };
            let outcome = kernel.run(&req, &mut |e| collector.add(e));
            state.pgid.store(0, Ordering::SeqCst);
            outcome
        };
        if let Some(k) = &self.kernel {
            if let Some(s) = self
                .kernels
                .lock()
                .expect("kernels lock")
                .get_mut(&self.lang)
            {
                s.executions = k.executions;
            }
        }
        let cancelled = state.cancelled.load(Ordering::SeqCst);
        let mut errors = std::mem::take(&mut collector.errors);
        match outcome {
            Outcome::Done {
                status,
                cancelled: saw_interrupt,
            } => {
                if cancelled || saw_interrupt {
                    let trace = errors
                        .iter()
                        .find(|e| e.extra.contains_key("cancelled"))
                        .and_then(|e| e.stack_trace.clone());
                    errors.retain(|e| !e.extra.contains_key("cancelled"));
                    let mut err =
                        CodeError::new("Cancelled", format!("Job \"{job}\" was cancelled"));
                    err.stack_trace = trace;
                    errors.push(err);
                } else if let Some(status) = status.filter(|s| *s != 0) {
                    errors.push(CodeError::new(
                        "ExitStatus",
                        format!("The {lang} code exited with status {status}"),
                    ));
                }
            }
            Outcome::Died { how } => {
                self.kernel = None;
                self.kernels
                    .lock()
                    .expect("kernels lock")
                    .remove(&self.lang);
                let message = if cancelled {
                    format!("Job \"{job}\" was cancelled; the {lang} kernel did not stop when interrupted and was killed ({how}), so its state was lost. The next execution starts a fresh kernel.")
                } else {
                    format!("The {lang} kernel died ({how}); its state was lost. The next execution starts a fresh kernel.")
                };
                self.out
                    .notify(method::LOG, json!({"level": "warn", "message": message}));
                self.lost = Some(format!("died ({how})"));
                let kind = if cancelled { "Cancelled" } else { "KernelDied" };
                errors.push(CodeError::new(kind, message));
            }
        }
        collector.finish();
        let outputs = std::mem::take(&mut collector.outputs);
        finish(
            node,
            expression,
            outputs,
            errors,
            started.elapsed().as_secs_f64(),
        )
    }
}

/// Gathers a job's output in order, streams it to the host, and enforces the output cap.
struct Collector {
    job: String,
    out: Writer,
    outputs: Vec<Value>,
    errors: Vec<CodeError>,
    last_stream: Option<Stream>,
    bytes: usize,
    limit: usize,
    truncated: bool,
}

impl Collector {
    fn new(job: &str, limit: usize, out: Writer) -> Self {
        Collector {
            job: job.to_string(),
            out,
            outputs: Vec::new(),
            errors: Vec::new(),
            last_stream: None,
            bytes: 0,
            limit,
            truncated: false,
        }
    }

    fn add(&mut self, event: Event) {
        match event {
            Event::Text(stream, mut text) => {
                if self.truncated {
                    return;
                }
                if self.bytes + text.len() > self.limit {
                    let mut n = self.limit - self.bytes;
                    while !text.is_char_boundary(n) {
                        n -= 1;
                    }
                    text.truncate(n);
                    self.truncated = true;
                }
                self.bytes += text.len();
                if text.is_empty() {
                    return;
                }
                self.out.notify(
                    method::OUTPUT,
                    Output {
                        job: self.job.clone(),
                        stream: Some(stream),
                        text: Some(text.clone()),
                        node: None,
                    },
                );
                match (self.last_stream, self.outputs.last_mut()) {
                    (Some(s), Some(Value::String(last))) if s == stream => last.push_str(&text),
                    _ => self.outputs.push(Value::String(text)),
                }
                self.last_stream = Some(stream);
            }
            Event::Value(v) => {
                if self.truncated {
                    return;
                }
                let size = serde_json::to_string(&v).map(|s| s.len()).unwrap_or(0);
                if self.bytes + size > self.limit {
                    self.truncated = true;
                    return;
                }
                self.bytes += size;
                self.out.notify(
                    method::OUTPUT,
                    Output {
                        job: self.job.clone(),
                        stream: None,
                        text: None,
                        node: Some(v.clone()),
                    },
                );
                self.outputs.push(v);
                self.last_stream = None;
            }
            Event::Error(e) => self.errors.push(e),
        }
    }

    fn finish(&mut self) {
        if self.truncated {
            let notice = format!(
                "\n[output truncated: this execution's output exceeded the limit of {} bytes]\n",
                self.limit
            );
            self.out.notify(
                method::OUTPUT,
                Output {
                    job: self.job.clone(),
                    stream: Some(Stream::Stderr),
                    text: Some(notice.clone()),
                    node: None,
                },
            );
            self.outputs.push(Value::String(notice));
        }
    }
}

/// The executed node: the node as sent, with outputs/output, errors and duration set.
fn finish(
    mut node: Value,
    expression: bool,
    outputs: Vec<Value>,
    errors: Vec<CodeError>,
    duration: f64,
) -> Value {
    let Some(obj) = node.as_object_mut() else {
        return node;
    };
    if expression {
        // An expression's output is its value (for bash, its trimmed stdout).
        let value = outputs
            .iter()
            .find(|v| !v.is_string())
            .cloned()
            .or_else(|| {
                let text: String = outputs.iter().filter_map(Value::as_str).collect();
                (!text.is_empty()).then(|| Value::String(text.trim_end_matches('\n').to_string()))
            });
        match value {
            Some(v) => obj.insert("output".into(), v),
            None => obj.remove("output"),
        };
    } else if outputs.is_empty() {
        obj.remove("outputs");
    } else {
        obj.insert("outputs".into(), Value::Array(outputs));
    }
    if errors.is_empty() {
        obj.remove("errors");
    } else {
        obj.insert(
            "errors".into(),
            serde_json::to_value(errors).unwrap_or(Value::Null),
        );
    }
    obj.insert("duration".into(), json!(duration));
    node
}

enum LineRead {
    Line,
    Eof,
    /// The line was longer than allowed (and was skipped); how much was read.
    TooLong(usize),
}

/// Read one line into `buf` (without the newline), refusing to hold more than `max` bytes.
fn read_line(input: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<LineRead> {
    let mut skipped = 0usize;
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() && skipped == 0 {
                LineRead::Eof
            } else if skipped > 0 {
                LineRead::TooLong(skipped)
            } else {
                LineRead::Line
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if skipped > 0 || buf.len() + chunk.len() > max {
            skipped += buf.len() + chunk.len();
            buf.clear();
        } else {
            buf.extend_from_slice(chunk);
        }
        let used = found.unwrap_or(chunk.len());
        input.consume(used);
        if found.is_some() {
            return Ok(if skipped > 0 {
                LineRead::TooLong(skipped)
            } else {
                LineRead::Line
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_over_the_limit_are_skipped_whole() {
        let data = b"short\nthis line is far too long\nok\n";
        let mut input = &data[..];
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut input, &mut buf, 10).unwrap(),
            LineRead::Line
        ));
        assert_eq!(buf, b"short");
        buf.clear();
        assert!(matches!(
            read_line(&mut input, &mut buf, 10).unwrap(),
            LineRead::TooLong(_)
        ));
        buf.clear();
        assert!(matches!(
            read_line(&mut input, &mut buf, 10).unwrap(),
            LineRead::Line
        ));
        assert_eq!(buf, b"ok");
        buf.clear();
        assert!(matches!(
            read_line(&mut input, &mut buf, 10).unwrap(),
            LineRead::Eof
        ));
    }

    #[test]
    fn finish_sets_and_clears_fields() {
        let node =
            json!({"type":"CodeChunk","text":"x","outputs":["stale"],"errors":[{}],"id":"c"});
        let done = finish(node, false, vec![json!(2)], vec![], 0.5);
        assert_eq!(
            done,
            json!({"type":"CodeChunk","text":"x","outputs":[2],"id":"c","duration":0.5})
        );
        let expr = finish(
            json!({"type":"CodeExpression","text":"echo"}),
            true,
            vec![json!("hi\n")],
            vec![],
            0.1,
        );
        assert_eq!(expr["output"], "hi");
    }
}
