//! A kernel: one persistent interpreter process per language per session.
//!
//! The agent talks to a kernel over two pipes, fd 3 (requests, agent → kernel) and fd 4
//! (messages, kernel → agent), one JSON object per line (see `kernels/python.py`). The
//! kernel's own stdout and stderr are two more pipes, which catch what subprocesses and C
//! code write to the file descriptors directly. The kernel leads its own process group, so
//! that a cancel's SIGINT reaches it and everything it started.

use crate::languages::Lang;
use crate::reaper;
use crate::sys;
use serde_json::{json, Value};
use sparkla_protocol::agent::Stream;
use sparkla_protocol::CodeError;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a kernel produces while it runs a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(Stream, String),
    Value(Value),
    Error(CodeError),
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The kernel finished the request and is ready for the next.
    Done {
        /// Bash's exit status of the chunk.
        status: Option<i64>,
        /// The kernel saw the interrupt (KeyboardInterrupt, SIGINT trap).
        cancelled: bool,
    },
    /// The kernel process died; its state is lost.
    Died { how: String },
}

/// A request to a kernel.
pub struct Request<'a> {
    pub code: &'a str,
    pub expression: bool,
    pub cell: u64,
}

pub struct Kernel {
    pub lang: Lang,
    pub pid: i32,
    pub executions: u64,
    requests: File,
    messages: File,
    stdout: File,
    stderr: File,
    pidfd: Option<OwnedFd>,
    pending: Vec<u8>,
    utf8: [Utf8Carry; 2],
}

impl Kernel {
    /// Start a kernel and wait until it says it is ready.
    pub fn start(lang: Lang) -> Result<Kernel, String> {
        let interpreter = lang
            .interpreter()
            .ok_or_else(|| format!("no interpreter found for {}", lang.name()))?;
        let err = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let (req_r, req_w) = sys::pipe().map_err(|e| err("pipe", e))?;
        let (msg_r, msg_w) = sys::pipe().map_err(|e| err("pipe", e))?;
        let (out_r, out_w) = sys::pipe().map_err(|e| err("pipe", e))?;
        let (errp_r, errp_w) = sys::pipe().map_err(|e| err("pipe", e))?;
        let (req_fd, msg_fd) = (req_r.as_raw_fd(), msg_w.as_raw_fd());
        let mut cmd = Command::new(&interpreter);
        let stdin = match lang {
            Lang::Bash => Stdio::from(req_r.try_clone().map_err(|e| err("dup", e))?),
            _ => Stdio::null(),
        };
        cmd.args(lang.args())
            .stdin(stdin)
            .stdout(Stdio::from(OwnedFd::from(out_w)))
            .stderr(Stdio::from(OwnedFd::from(errp_w)));
        if std::env::var_os("MPLBACKEND").is_none() {
            cmd.env("MPLBACKEND", "Agg");
        }
        if std::env::var_os("PYTHONHASHSEED").is_none() {
            cmd.env("PYTHONHASHSEED", "0");
        }
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close, setsid) between fork and
        // exec. The pipes are first copied above fd 10, so that neither can be overwritten by
        // the other's dup2 (or be fd 3/4 already, where dup2 would keep close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(req_fd, libc::F_DUPFD, 10);
                let b = libc::fcntl(msg_fd, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(b);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", interpreter.display()))?;
        let pid = child.id() as i32;
        reaper::watch(pid);
        drop(child); // never waited on: the reaper collects it
        drop((req_r, msg_w));
        // Ours alone (the kernel holds the other ends): read only after poll, or to drain.
        sys::set_nonblocking(out_r.as_raw_fd(), true).map_err(|e| err("fcntl", e))?;
        sys::set_nonblocking(errp_r.as_raw_fd(), true).map_err(|e| err("fcntl", e))?;
        let mut kernel = Kernel {
            lang,
            pid,
            executions: 0,
            requests: req_w,
            messages: msg_r,
            stdout: out_r,
            stderr: errp_r,
            pidfd: sys::pidfd_open(pid),
            pending: Vec::new(),
            utf8: [Utf8Carry::default(), Utf8Carry::default()],
        };
        if lang == Lang::Bash {
            let script = lang.script().unwrap_or_default();
            if let Err(e) = kernel.requests.write_all(format!("{script}\n").as_bytes()) {
                kernel.kill();
                return Err(format!("bash kernel failed to start: {e}"));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut startup = Vec::new();
        loop {
            match kernel.read_messages(deadline, &mut |e| {
                if let Event::Text(_, t) = e {
                    startup.push(t)
                }
            }) {
                Ok(Some(msg)) if msg["t"] == "ready" => return Ok(kernel),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    kernel.kill();
                    return Err(format!("{} kernel did not start in time", lang.name()));
                }
                Err(how) => {
                    let said = startup.concat();
                    return Err(format!(
                        "{} kernel failed to start ({how}){}{}",
                        lang.name(),
                        if said.is_empty() { "" } else { ": " },
                        said.trim()
                    ));
                }
            }
        }
    }

    /// Run one request, passing what the kernel produces to `sink` as it comes.
    pub fn run(&mut self, req: &Request, sink: &mut dyn FnMut(Event)) -> Outcome {
        self.executions += 1;
        let line = match self.lang {
            Lang::Bash => {
                let code = if req.expression {
                    req.code.trim()
                } else {
                    req.code
                };
                format!(
                    "__sparkla_code={}; __sparkla_begin; eval \"$__sparkla_code\" </dev/null 4>&-; __sparkla_end $?\n",
                    ansi_c_quote(code)
                )
            }
            Lang::Python | Lang::R => {
                // "<mode> <cell> <code as hex>": base R reads no JSON, and a Python kernel
                // that need not import `json` starts faster.
                let mode = if req.expression {
                    "expression"
                } else {
                    "chunk"
                };
                let mut s = format!("{mode} {} ", req.cell);
                for b in req.code.as_bytes() {
                    s.push_str(&format!("{b:02x}"));
                }
                s.push('\n');
                s
            }
            _ => {
                let mode = if req.expression {
                    "expression"
                } else {
                    "chunk"
                };
                let mut s = json!({"code": req.code, "mode": mode, "cell": req.cell}).to_string();
                s.push('\n');
                s
            }
        };
        if let Err(e) = self.requests.write_all(line.as_bytes()) {
            return Outcome::Died {
                how: self.death(&format!("it stopped reading requests: {e}")),
            };
        }
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            match self.read_messages(far, &mut |e| sink(e)) {
                Ok(Some(msg)) => match msg["t"].as_str() {
                    Some("done") => {
                        self.drain(&mut |e| sink(e));
                        return Outcome::Done {
                            status: msg["status"].as_i64(),
                            cancelled: msg["cancelled"].as_bool().unwrap_or(false),
                        };
                    }
                    Some("val") => sink(Event::Value(msg["v"].clone())),
                    Some("err") => {
                        if let Ok(mut e) = serde_json::from_value::<CodeError>(msg["e"].clone()) {
                            if msg["cancelled"] == true {
                                e.extra.insert("cancelled".into(), true.into());
                            }
                            sink(Event::Error(e));
                        }
                    }
                    Some("out") => {
                        let stream = if msg["s"] == "stderr" {
                            Stream::Stderr
                        } else {
                            Stream::Stdout
                        };
                        if let Some(x) = msg["x"].as_str() {
                            sink(Event::Text(stream, x.to_string()));
                        }
                    }
                    _ => {}
                },
                Ok(None) => unreachable!("no deadline"),
                Err(how) => return Outcome::Died { how },
            }
        }
    }

    /// Read until one complete message arrives from fd 4 (returned), the deadline passes
    /// (`Ok(None)`), or the kernel dies (`Err(how)`). Stdout/stderr text goes to `sink`.
    fn read_messages(
        &mut self,
        deadline: Instant,
        sink: &mut dyn FnMut(Event),
    ) -> Result<Option<Value>, String> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                match serde_json::from_slice(&line) {
                    Ok(v) => return Ok(Some(v)),
                    Err(_) => continue, // not ours (user code wrote to fd 4): ignore
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).as_millis().min(1000) as i32;
            let mut fds = vec![
                self.messages.as_raw_fd(),
                self.stdout.as_raw_fd(),
                self.stderr.as_raw_fd(),
            ];
            if let Some(p) = &self.pidfd {
                fds.push(p.as_raw_fd());
            }
            let revents = sys::poll(&fds, wait).map_err(|e| format!("poll failed: {e}"))?;
            let mut buf = [0u8; 64 * 1024];
            for (i, stream) in [(1, Stream::Stdout), (2, Stream::Stderr)] {
                if revents[i] & (libc::POLLIN | libc::POLLHUP) != 0 {
                    let file = if i == 1 { &self.stdout } else { &self.stderr };
                    if let Ok(n) = (&*file).read(&mut buf) {
                        if n > 0 {
                            let text = self.utf8[i - 1].decode(&buf[..n]);
                            if !text.is_empty() {
                                sink(Event::Text(stream, text));
                            }
                        }
                    }
                }
            }
            if revents[0] & (libc::POLLIN | libc::POLLHUP) != 0 {
                match (&self.messages).read(&mut buf) {
                    Ok(0) | Err(_) => return Err(self.death("it closed its message pipe")),
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                }
                continue;
            }
            let exited = match revents.get(3) {
                Some(r) => *r & libc::POLLIN != 0,
                None => reaper::has_exited(self.pid),
            };
            if exited {
                // Take any last message the kernel managed to write before dying.
                sys::set_nonblocking(self.messages.as_raw_fd(), true).ok();
                while let Ok(n) = (&self.messages).read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    self.pending.extend_from_slice(&buf[..n]);
                }
                if self.pending.contains(&b'\n') {
                    continue;
                }
                return Err(self.death("it exited"));
            }
        }
    }

    /// Read what is already waiting in stdout/stderr, without blocking. Output written by a
    /// request's subprocesses before the kernel said "done" is in the pipes by now.
    fn drain(&mut self, sink: &mut dyn FnMut(Event)) {
        let mut buf = [0u8; 64 * 1024];
        for (i, stream) in [(0usize, Stream::Stdout), (1, Stream::Stderr)] {
            loop {
                let file = if i == 0 { &self.stdout } else { &self.stderr };
                match (&*file).read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let text = self.utf8[i].decode(&buf[..n]);
                        sink(Event::Text(stream, text));
                    }
                    _ => break,
                }
            }
        }
    }

    /// The kernel is dead or dying: kill what is left of its process group, and describe
    /// how it ended.
    fn death(&mut self, context: &str) -> String {
        let status = reaper::wait_status(self.pid, Duration::from_millis(500)).or_else(|| {
            sys::kill_group(self.pid, libc::SIGKILL);
            reaper::wait_status(self.pid, Duration::from_secs(2))
        });
        sys::kill_group(self.pid, libc::SIGKILL);
        match status {
            Some(s) => sys::describe_status(s),
            None => context.to_string(),
        }
    }

    /// Kill the kernel and everything in its process group.
    pub fn kill(&mut self) {
        sys::kill_group(self.pid, libc::SIGKILL);
        reaper::forget(self.pid);
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Quote text for bash as `$'...'`, so that it survives on one line exactly.
fn ansi_c_quote(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 8);
    s.push_str("$'");
    for c in text.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\'' => s.push_str("\\'"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\0' => {}
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                s.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

/// Decodes a byte stream as UTF-8, keeping a character split across reads whole and
/// replacing invalid bytes with U+FFFD.
#[derive(Default)]
struct Utf8Carry {
    carry: Vec<u8>,
}

impl Utf8Carry {
    fn decode(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.carry;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &after[n..];
                        }
                        None => {
                            rest = after; // an incomplete character: wait for more bytes
                            break;
                        }
                    }
                }
            }
        }
        self.carry = rest.to_vec();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Carry;

    #[test]
    fn ansi_c_quoting() {
        assert_eq!(
            super::ansi_c_quote("a'b\\c\nd\te"),
            "$'a\\'b\\\\c\\nd\\x09e'"
        );
    }

    #[test]
    fn utf8_split_across_reads_and_invalid_bytes() {
        let mut d = Utf8Carry::default();
        let bytes = "héllo €".as_bytes();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&d.decode(&[*b]));
        }
        assert_eq!(out, "héllo €");
        assert_eq!(d.decode(b"a\xffb"), "a\u{FFFD}b");
    }
}
