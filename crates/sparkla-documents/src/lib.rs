//! Executing whole documents in one fresh Sparkla session: Jupyter notebooks, Markdown
//! (with `.qmd`/`.Rmd`-style chunks) and Stencila JSON.
//!
//! [`execute`] reads a document, checks that its output can be written, starts one session
//! (on a runtime of this process, or on a remote server), runs every chunk in document order,
//! stores the outputs in the document's own form with provenance, and writes the result
//! atomically. With [`ExecuteOptions::check`] it re-executes and compares instead of writing.
//!
//! - [`document`]: the [`Document`](document::Document) trait every format implements;
//! - [`notebook`], [`markdown`], [`stencila`]: the formats;
//! - [`executor`]: the [`Executor`](executor::Executor) trait, its embedded and remote backends;
//! - [`cli`]: the clap arguments of `sparkla execute` and the function the CLI calls.

pub mod canonical;
pub mod cli;
pub mod document;
pub mod executor;
pub mod markdown;
pub mod notebook;
pub mod render;
pub mod stencila;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use sparkla_runtime::Runtime;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use document::{ChunkResult, Document};
use executor::{Embedded, Executor, Remote};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not valid JSON.
    #[error("{}: {message} at line {line}, column {column}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The input is JSON but not a document of its format.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Options that do not fit together.
    #[error("{0}")]
    Usage(String),
    /// The session could not start, or failed.
    #[error("session: {0}")]
    Session(String),
    /// Ctrl-C: nothing was written.
    #[error("interrupted: nothing was written")]
    Interrupted,
}

impl Error {
    pub(crate) fn parse(path: &Path, e: &serde_json::Error) -> Self {
        let message = e.to_string();
        // serde_json appends " at line L column C"; we say it our way.
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        Error::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message,
        }
    }
}

/// A document format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Jupyter notebook (`.ipynb`).
    Ipynb,
    /// Markdown (`.md`, `.qmd`, `.Rmd`).
    Markdown,
    /// Stencila JSON (`.json`).
    Json,
}

impl Format {
    pub fn from_name(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "ipynb" | "jupyter" | "notebook" => Some(Format::Ipynb),
            "md" | "markdown" | "qmd" | "rmd" => Some(Format::Markdown),
            "json" | "stencila" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn from_path(path: &Path) -> Option<Format> {
        Format::from_name(path.extension()?.to_str()?)
    }
}

/// Where the executed document goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output (nothing on disk changes; Markdown figures are inlined).
    Stdout,
    /// This file (atomically replaced if it exists).
    File(PathBuf),
    /// Back over the input (atomically).
    InPlace,
}

/// Which session to run in.
#[derive(Clone)]
pub enum Session {
    /// A runtime of this process, by name (`sandbox`, `docker`, `process`).
    Runtime {
        name: String,
        agent: Option<PathBuf>,
        environment: Option<String>,
    },
    /// A runtime built by the caller (tests, embedding programs).
    Given {
        runtime: Arc<dyn Runtime>,
        environment: Option<String>,
    },
    /// A Sparkla server (`ws://host:port`), with a JWT.
    Remote {
        url: String,
        token: Option<String>,
        environment: Option<String>,
    },
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Session::Runtime {
                name, environment, ..
            } => f
                .debug_struct("Runtime")
                .field("name", name)
                .field("environment", environment)
                .finish(),
            Session::Given {
                runtime,
                environment,
            } => f
                .debug_struct("Given")
                .field("runtime", &runtime.name())
                .field("environment", environment)
                .finish(),
            Session::Remote {
                url, environment, ..
            } => f
                .debug_struct("Remote")
                .field("url", url)
                .field("environment", environment)
                .finish_non_exhaustive(),
        }
    }
}

/// Whether to draw a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// On a terminal (stderr) only.
    Auto,
    Never,
}

/// Everything [`execute`] needs (no clap here: see [`cli::ExecuteArgs`] for the command line).
#[derive(Clone, Debug)]
pub struct ExecuteOptions {
    pub input: PathBuf,
    pub output: Output,
    /// Override the format guessed from the input's extension.
    pub from: Option<Format>,
    pub session: Session,
    /// Run every chunk even after one fails.
    pub continue_on_error: bool,
    /// Re-execute and compare with the stored outputs; never write.
    pub check: bool,
    pub progress: Progress,
    /// Extra session environment variables (over the fixed ones).
    pub env: Vec<(String, String)>,
}

impl ExecuteOptions {
    pub fn new(input: impl Into<PathBuf>, session: Session) -> Self {
        ExecuteOptions {
            input: input.into(),
            output: Output::Stdout,
            from: None,
            session,
            continue_on_error: false,
            check: false,
            progress: Progress::Auto,
            env: Vec::new(),
        }
    }
}

/// The outcome of one chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkReport {
    pub label: String,
    pub language: Option<String>,
    /// `None`: not executed (execution stopped at an earlier error).
    pub duration: Option<f64>,
    pub errors: usize,
    /// `sha256:` of the canonical JSON of the chunk's outputs as stored.
    pub digest: Option<String>,
    /// `--check`: the readable diff when the outputs differ from those stored.
    pub diff: Option<String>,
}

/// What [`execute`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub chunks: Vec<ChunkReport>,
    pub runtime: String,
    pub total: Duration,
    /// The rendered document when the output is [`Output::Stdout`] (the caller prints it).
    pub document: Option<Vec<u8>>,
    /// Files written (the document, figures).
    pub written: Vec<PathBuf>,
}

impl Report {
    pub fn executed(&self) -> usize {
        self.chunks.iter().filter(|c| c.duration.is_some()).count()
    }
    pub fn errors(&self) -> usize {
        self.chunks.iter().filter(|c| c.errors > 0).count()
    }
    pub fn differing(&self) -> Vec<&ChunkReport> {
        self.chunks.iter().filter(|c| c.diff.is_some()).collect()
    }
    /// Success: for a check, every chunk reproduced; otherwise no chunk failed.
    pub fn success(&self, check: bool) -> bool {
        if check {
            self.differing().is_empty()
        } else {
            self.errors() == 0
        }
    }
}

/// Read a document of a format.
pub fn parse(
    path: &Path,
    bytes: Vec<u8>,
    format: Format,
    images: markdown::Images,
    base: PathBuf,
) -> Result<Box<dyn Document>, Error> {
    Ok(match format {
        Format::Ipynb => Box::new(notebook::Notebook::parse(path, &bytes)?),
        Format::Json => Box::new(stencila::Stencila::parse(path, &bytes)?),
        Format::Markdown => {
            let text = String::from_utf8(bytes).map_err(|e| {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
                let column =
                    valid.len() - valid.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
                Error::Parse {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message: "invalid UTF-8".into(),
                }
            })?;
            Box::new(markdown::Markdown::parse(text, images, base))
        }
    })
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fail now, before any session, if `path` cannot be written (its directory is missing or
/// read-only, or it is a directory).
fn check_writable(path: &Path) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    let dir = dir_of(path);
    if !dir.is_dir() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the directory {} does not exist", dir.display()),
        )));
    }
    tempfile::Builder::new()
        .prefix(".sparkla-probe-")
        .tempfile_in(&dir)
        .map(drop)
        .map_err(|e| {
            err(std::io::Error::new(
                e.kind(),
                format!("the directory {} is not writable ({e})", dir.display()),
            ))
        })?;
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(err)?;
    }
    Ok(())
}

/// Write a file atomically: a temporary file in the same directory, synced, then renamed over
/// the target (keeping the target's permissions when it exists).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = dir_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".sparkla-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    let perms = match std::fs::metadata(path) {
        Ok(m) => m.permissions(),
        Err(_) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::Permissions::from_mode(0o644)
        }
    };
    tmp.as_file().set_permissions(perms).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether an error means "this chunk's language cannot run here" (the others still run).
fn unsupported_language(r: &ChunkResult) -> bool {
    !r.errors.is_empty()
        && r.errors
            .iter()
            .all(|e| e.error_type.as_deref() == Some("UnknownLanguage"))
}

/// Resolves on SIGINT, SIGTERM or SIGHUP.
async fn interrupt() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let recv = |s: &mut Option<tokio::signal::unix::Signal>| {
        let s = s.take();
        async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = recv(&mut term) => {}
        _ = recv(&mut hup) => {}
    }
}

/// The executor of a document without code: starts nothing.
struct NoSession;

#[async_trait::async_trait]
impl Executor for NoSession {
    async fn begin(&mut self) -> Result<executor::SessionInfo, Error> {
        Ok(executor::SessionInfo {
            runtime: "none".into(),
            environment: Value::Null,
        })
    }
    async fn execute(&mut self, _job: &str, _node: Value) -> Result<ChunkResult, Error> {
        Err(Error::Session("no session".into()))
    }
    async fn end(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Execute a document: see the crate documentation.
pub async fn execute(opts: ExecuteOptions) -> Result<Report, Error> {
    let started = Instant::now();
    let format = match opts.from.or_else(|| Format::from_path(&opts.input)) {
        Some(f) => f,
        None => {
            return Err(Error::Usage(format!(
                "{}: unknown format (use .ipynb, .md/.qmd/.Rmd or .json, or --from)",
                opts.input.display()
            )))
        }
    };
    // Everything that can fail without a session fails here, before one starts.
    let bytes = std::fs::read(&opts.input).map_err(|source| Error::Read {
        path: opts.input.clone(),
        source,
    })?;
    let target: Option<PathBuf> = match (&opts.output, opts.check) {
        (_, true) => None,
        (Output::Stdout, _) => None,
        (Output::File(p), _) => Some(p.clone()),
        (Output::InPlace, _) => Some(opts.input.clone()),
    };
    if let Some(t) = &target {
        check_writable(t)?;
    }
    let (images, base) = match (&opts.output, &target) {
        (_, Some(t)) => (markdown::Images::beside(t), dir_of(t)),
        (Output::Stdout, None) if !opts.check => (markdown::Images::Inline, dir_of(&opts.input)),
        _ => (markdown::Images::beside(&opts.input), dir_of(&opts.input)),
    };
    let mut doc = parse(&opts.input, bytes, format, images, base)?;
    let chunks = doc.chunks().to_vec();
    let stored: Vec<Value> = (0..chunks.len()).map(|i| doc.stored(i)).collect();

    let mut executor: Box<dyn Executor> = match &opts.session {
        // Nothing to run: no session.
        _ if chunks.is_empty() => Box::new(NoSession),
        Session::Runtime {
            name,
            agent,
            environment,
        } => {
            let runtime = executor::runtime_named(name, agent.clone()).await?;
            Box::new(Embedded::new(
                runtime,
                environment.clone(),
                opts.env.clone(),
            ))
        }
        Session::Given {
            runtime,
            environment,
        } => Box::new(Embedded::new(
            runtime.clone(),
            environment.clone(),
            opts.env.clone(),
        )),
        Session::Remote {
            url,
            token,
            environment,
        } => Box::new(Remote::new(url.clone(), token.clone(), environment.clone())),
    };

    let bar = if opts.progress == Progress::Auto && std::io::stderr().is_terminal() {
        let bar =
            ProgressBar::with_draw_target(Some(chunks.len() as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("progress template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.set_message("starting the session");

    // Ctrl-C, and the terminal going away or a polite kill: stop the session, write nothing.
    let mut ctrl_c = Box::pin(interrupt());
    let interrupted = |bar: &ProgressBar| {
        bar.abandon_with_message("interrupted");
    };

    let info = tokio::select! {
        r = executor.begin() => match r {
            Ok(info) => info,
            Err(e) => {
                let _ = executor.end().await;
                bar.finish_and_clear();
                return Err(e);
            }
        },
        _ = &mut ctrl_c => {
            let _ = executor.end().await;
            interrupted(&bar);
            return Err(Error::Interrupted);
        }
    };

    let mut reports: Vec<ChunkReport> = chunks
        .iter()
        .map(|c| ChunkReport {
            label: c.label.clone(),
            language: c.language.clone(),
            duration: None,
            errors: 0,
            digest: None,
            diff: None,
        })
        .collect();
    let mut stopped = false;
    for (i, chunk) in chunks.iter().enumerate() {
        bar.set_position(i as u64);
        bar.set_message(format!(
            "{} ({})",
            chunk.label,
            chunk.language.as_deref().unwrap_or("no language")
        ));
        let node = doc.node(i);
        let job = format!("chunk-{}", i + 1);
        let result = tokio::select! {
            r = executor.execute(&job, node.clone()) => r,
            _ = &mut ctrl_c => {
                let _ = executor.end().await;
                interrupted(&bar);
                return Err(Error::Interrupted);
            }
        };
        let (result, fatal) = match result {
            Ok(r) => (r, false),
            // The session failed: this chunk gets the error, and nothing more can run.
            Err(e) => (
                ChunkResult::error(
                    node,
                    sparkla_protocol::CodeError::new("SessionError", e.to_string()),
                ),
                true,
            ),
        };
        doc.apply(i, &result);
        reports[i].duration = Some(result.duration);
        reports[i].errors = result.errors.len();
        if fatal {
            stopped = true;
            break;
        }
        if !result.errors.is_empty()
            && !opts.continue_on_error
            && !opts.check
            && !unsupported_language(&result)
        {
            stopped = true;
            break;
        }
    }
    bar.set_position(reports.iter().filter(|r| r.duration.is_some()).count() as u64);
    let ended = executor.end().await;
    bar.finish_and_clear();
    if let Err(e) = ended {
        tracing::warn!(error = %e, "ending the session");
    }

    for (i, r) in reports.iter_mut().enumerate() {
        let now = doc.stored(i);
        r.digest = Some(canonical::digest(&now));
        if opts.check && now != stored[i] {
            r.diff = Some(canonical::diff(&stored[i], &now));
        }
    }
    let total = started.elapsed();
    let provenance = json!({
        "sparkla": sparkla_protocol::VERSION,
        "executedAt": rfc3339(SystemTime::now()),
        "runtime": info.runtime,
        "environment": info.environment,
        "duration": total.as_secs_f64(),
        "complete": !stopped,
        "chunks": reports.iter().map(|r| json!({
            "label": r.label,
            "language": r.language,
            "executed": r.duration.is_some(),
            "duration": r.duration,
            "errors": r.errors,
            "outputDigest": r.digest,
        })).collect::<Vec<_>>(),
    });
    doc.set_provenance(provenance);

    let mut report = Report {
        chunks: reports,
        runtime: info.runtime.clone(),
        total,
        document: None,
        written: Vec::new(),
    };
    if opts.check {
        return Ok(report);
    }
    let rendered = doc.render();
    match target {
        None => report.document = Some(rendered),
        Some(t) => {
            let side = doc.side_files();
            for f in &side {
                if let Some(dir) = f.path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                if std::fs::read(&f.path).ok().as_deref() != Some(&f.bytes[..]) {
                    write_atomic(&f.path, &f.bytes)?;
                }
                report.written.push(f.path.clone());
            }
            write_atomic(&t, &rendered)?;
            report.written.push(t);
            // Figures of earlier runs that the document no longer links (only files named
            // as this crate names figures, in the document's figure directory).
            for old in doc.obsolete_files() {
                if !report.written.contains(&old) {
                    let _ = std::fs::remove_file(&old);
                }
            }
        }
    }
    Ok(report)
}
