//! The `firecracker` runtime: each session is a Firecracker microVM booted from the shared
//! guest image, driven over Firecracker's API socket; the agent is reached through
//! Firecracker's hybrid vsock.
//!
//! * **Prerequisites:** the `firecracker` binary (path configurable, default on PATH), read
//!   and write access to `/dev/kvm` (checked when the runtime is made; the error explains
//!   `setfacl -m u:$USER:rw /dev/kvm`), a kernel with virtio-mmio command-line devices, ext4
//!   and vsock built in (see [`super::guest`]), and `rootfs.ext4` from `sparkla guest build`.
//! * **VM home:** `<base>/vm-<server id>-<session>-<pid>-<n>` (default base `/tmp`) holds
//!   `api.sock`, `log.fifo` and `metrics.fifo` (named pipes; read them with
//!   `cat /tmp/vm-<id>/log.fifo`; unread output is dropped, Firecracker writes them
//!   non-blocking), `v.sock` (the hybrid vsock), `scratch.ext4`, `firecracker.out` (its
//!   stdout/stderr: the guest's serial console) and `vmm.pid`. Firecracker runs with the home
//!   as its working directory and per-VM files are given to it by *relative* paths, so that a
//!   snapshot taken in one home restores in another.
//! * **Boot:** `PUT /logger`, `/metrics`, `/machine-config` (vCPUs and memory from the
//!   session's limits), `/boot-source` (`init=/sbin/sparkla-init`, `sparkla.listen=vsock:1024`),
//!   `/drives/rootfs` (read-only root), `/drives/scratch` (the session's writable scratch
//!   drive), `/vsock` (`uds_path` `v.sock`), then `PUT /actions` `InstanceStart`. Then
//!   `CONNECT 1024` over `v.sock` until the agent answers ([`super::vsock`]).
//! * **Snapshots** ([`FirecrackerConfig::snapshots`], off by default): the first session of
//!   a VM shape boots a template VM, warms the python and bash kernels, pauses it
//!   (`PATCH /vm`), snapshots it (`PUT /snapshot/create`) and kills it. Later sessions of that
//!   shape (without per-session environment variables, which the init reads at boot) copy the
//!   template's scratch drive into their home and restore (`PUT /snapshot/load` with
//!   `resume_vm` and a `vsock_override`).
//! * **Errors** from the API (`{"fault_message": ...}`) are surfaced as
//!   [`RuntimeError::Start`] naming the request and Firecracker's message.
//! * **Lifecycle:** `stop` (and drop) kills Firecracker and removes the home;
//!   [`FirecrackerRuntime::sweep`] reclaims the homes and VMMs of this server id. The jailer is
//!   not used (optional in the issue; off).

use super::vsock;
use super::{tail, VmInstance, VmShape};
use crate::{Instance, InstanceSpec, Limits, Runtime, RuntimeError, SweepReport};
use async_trait::async_trait;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const RUNTIME: &str = "firecracker";

pub mod api {
    //! A minimal HTTP/1.1 client for Firecracker's API socket.
    //!
    //! Why not hyper (already in the tree through bollard)? The API is a handful of small
    //! JSON requests, one at a time, each answered with a `Content-Length` body or `204`; a
    //! Unix-socket hyper client needs hyper-util and http-body-util glue and a connection
    //! task for that. This client opens one connection per request, writes the request, and
    //! reads the status line, headers and `Content-Length` body. The contract tests run it
    //! against a double that validates every request against Firecracker's OpenAPI spec.

    use serde_json::Value;
    use std::path::{Path, PathBuf};
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    /// What went wrong with an API request.
    #[derive(Debug, thiserror::Error)]
    pub enum ApiError {
        #[error("{method} {path}: cannot reach the Firecracker API at {socket}: {source}")]
        Io {
            method: String,
            path: String,
            socket: String,
            #[source]
            source: std::io::Error,
        },
        /// Firecracker refused the request (its `fault_message`, or the body).
        #[error("{method} {path} was refused by Firecracker (HTTP {status}): {fault}")]
        Fault {
            method: String,
            path: String,
            status: u16,
            fault: String,
        },
        #[error("{method} {path}: unreadable answer from Firecracker: {reason}")]
        Protocol {
            method: String,
            path: String,
            reason: String,
        },
        #[error("{method} {path}: no answer from Firecracker within {0:?}", .timeout)]
        Timeout {
            method: String,
            path: String,
            timeout: Duration,
        },
    }

    /// A response: status and (possibly empty) JSON body.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Response {
        pub status: u16,
        pub body: Option<Value>,
    }

    /// A client of one Firecracker API socket.
    #[derive(Debug, Clone)]
    pub struct ApiClient {
        socket: PathBuf,
        timeout: Duration,
    }

    impl ApiClient {
        pub fn new(socket: impl Into<PathBuf>) -> Self {
            Self {
                socket: socket.into(),
                timeout: Duration::from_secs(10),
            }
        }

        pub fn socket(&self) -> &Path {
            &self.socket
        }

        /// Send a request; any status is returned (see [`ApiClient::call`] for checked calls).
        pub async fn request(
            &self,
            method: &str,
            path: &str,
            body: Option<&Value>,
        ) -> Result<Response, ApiError> {
            match tokio::time::timeout(self.timeout, self.request_inner(method, path, body)).await {
                Ok(r) => r,
                Err(_) => Err(ApiError::Timeout {
                    method: method.into(),
                    path: path.into(),
                    timeout: self.timeout,
                }),
            }
        }

        async fn request_inner(
            &self,
            method: &str,
            path: &str,
            body: Option<&Value>,
        ) -> Result<Response, ApiError> {
            let io = |source| ApiError::Io {
                method: method.into(),
                path: path.into(),
                socket: self.socket.display().to_string(),
                source,
            };
            let proto = |reason: String| ApiError::Protocol {
                method: method.into(),
                path: path.into(),
                reason,
            };
            let mut stream = UnixStream::connect(&self.socket).await.map_err(io)?;
            let payload = body.map(|b| b.to_string()).unwrap_or_default();
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            );
            if body.is_some() {
                req.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    payload.len()
                ));
            }
            req.push_str("\r\n");
            req.push_str(&payload);
            stream.write_all(req.as_bytes()).await.map_err(io)?;
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.map_err(io)?;
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| proto(format!("bad status line {line:?}")))?;
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).await.map_err(io)? == 0 {
                    return Err(proto("the connection closed in the headers".into()));
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-length") {
                        length = v
                            .trim()
                            .parse()
                            .map_err(|_| proto(format!("bad Content-Length {v:?}")))?;
                    }
                }
            }
            let mut buf = vec![0u8; length];
            reader.read_exact(&mut buf).await.map_err(io)?;
            let body = if buf.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_slice(&buf)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&buf).into())),
                )
            };
            Ok(Response { status, body })
        }

        /// Send a request and fail with [`ApiError::Fault`] unless the status is 2xx.
        pub async fn call(
            &self,
            method: &str,
            path: &str,
            body: Option<&Value>,
        ) -> Result<Option<Value>, ApiError> {
            let r = self.request(method, path, body).await?;
            if (200..300).contains(&r.status) {
                return Ok(r.body);
            }
            let fault = match &r.body {
                Some(b) => b
                    .get("fault_message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| b.to_string()),
                None => "(no body)".into(),
            };
            Err(ApiError::Fault {
                method: method.into(),
                path: path.into(),
                status: r.status,
                fault,
            })
        }

        pub async fn put(&self, path: &str, body: &Value) -> Result<(), ApiError> {
            self.call("PUT", path, Some(body)).await.map(|_| ())
        }

        pub async fn patch(&self, path: &str, body: &Value) -> Result<(), ApiError> {
            self.call("PATCH", path, Some(body)).await.map(|_| ())
        }

        pub async fn get(&self, path: &str) -> Result<Option<Value>, ApiError> {
            self.call("GET", path, None).await
        }
    }
}

use api::{ApiClient, ApiError};

/// How the Firecracker runtime is set up. [`FirecrackerConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct FirecrackerConfig {
    /// Identifies this server's VM homes (for [`FirecrackerRuntime::sweep`]).
    pub server_id: String,
    /// The `firecracker` binary (default: `firecracker` on PATH).
    pub firecracker: PathBuf,
    /// The guest kernel (`vmlinux`; see [`super::guest`] for which).
    pub kernel: PathBuf,
    /// The guest root filesystem (default `rootfs.ext4` of [`super::guest::default_dir`]).
    pub rootfs: PathBuf,
    /// Where VM homes are made (default `/tmp`).
    pub base_dir: PathBuf,
    /// Limits applied when the session's own limits leave one unset.
    pub default_limits: Limits,
    /// Kernel arguments before Sparkla's own.
    pub boot_args: String,
    /// How long a VM may take until its agent answers on vsock.
    pub boot_timeout: Duration,
    /// Check `/dev/kvm` access when the runtime is made (off only for tests against a
    /// Firecracker double).
    pub check_kvm: bool,
    /// Boot one template VM per VM shape, snapshot it, and restore sessions from it.
    pub snapshots: bool,
    /// Extra environment variables for every session.
    pub env: Vec<(String, String)>,
}

impl FirecrackerConfig {
    /// Defaults: `firecracker` on PATH, kernel `vmlinux` and `rootfs.ext4` in the default guest
    /// directory, `/tmp`, 1 vCPU, 512 MiB, 256 processes, 256 MiB scratch, no snapshots.
    pub fn new(server_id: impl Into<String>) -> Self {
        let guest = super::guest::default_dir();
        Self {
            server_id: server_id.into(),
            firecracker: PathBuf::from("firecracker"),
            kernel: guest.join("vmlinux"),
            rootfs: guest.join("rootfs.ext4"),
            base_dir: PathBuf::from("/tmp"),
            default_limits: Limits {
                cpu_cores: Some(1.0),
                memory_bytes: Some(super::DEFAULT_MEMORY),
                pids: Some(256),
                scratch_bytes: Some(super::DEFAULT_SCRATCH),
            },
            boot_args: "console=ttyS0 reboot=k panic=1 pci=off quiet".into(),
            boot_timeout: Duration::from_secs(60),
            check_kvm: true,
            snapshots: false,
            env: Vec::new(),
        }
    }
}

/// A snapshot of a warmed-up template VM of one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub shape: VmShape,
    /// How long making it took.
    pub took: Duration,
}

/// Runs each session as a Firecracker microVM.
#[derive(Debug)]
pub struct FirecrackerRuntime {
    config: FirecrackerConfig,
    snapshots: tokio::sync::Mutex<HashMap<String, Snapshot>>,
}

/// Find a program on PATH (or check a path with a slash).
fn which(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
    })
}

fn unavailable(reason: String) -> RuntimeError {
    RuntimeError::Unavailable {
        runtime: RUNTIME,
        reason,
    }
}

impl FirecrackerRuntime {
    /// Check `/dev/kvm` access (unless disabled), the binary, the kernel and the rootfs.
    pub fn new(config: FirecrackerConfig) -> Result<Self, RuntimeError> {
        if config.check_kvm {
            super::kvm_accessible().map_err(unavailable)?;
        }
        let firecracker = which(&config.firecracker).ok_or_else(|| {
            unavailable(format!(
                "the firecracker binary {} was not found (install a release from the Firecracker project and put it on PATH, or configure its path)",
                config.firecracker.display()
            ))
        })?;
        for (what, f) in [
            ("kernel", &config.kernel),
            ("root filesystem", &config.rootfs),
        ] {
            if !f.is_file() {
                return Err(RuntimeError::Environment {
                    name: "firecracker".into(),
                    reason: format!(
                        "the guest {what} {} does not exist (rootfs: `{}`; kernel: a Firecracker vmlinux, see the README)",
                        f.display(),
                        super::guest::GUEST_BUILD_COMMAND
                    ),
                });
            }
        }
        let mut config = config;
        config.firecracker = firecracker;
        tracing::info!(firecracker = %config.firecracker.display(), kernel = %config.kernel.display(), rootfs = %config.rootfs.display(), snapshots = config.snapshots, "firecracker runtime ready");
        Ok(Self {
            config,
            snapshots: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// The kernel command line of a VM of this shape.
    pub fn boot_args(&self, shape: &VmShape) -> String {
        format!(
            "{} init=/sbin/sparkla-init {}",
            self.config.boot_args,
            shape.cmdline(&format!("vsock:{}", super::AGENT_VSOCK_PORT))
        )
    }

    /// The API requests of a cold boot, in order (public for the contract tests).
    pub fn boot_requests(&self, shape: &VmShape) -> Vec<(&'static str, String, Value)> {
        vec![
            (
                "PUT",
                "/logger".into(),
                json!({"log_path": "log.fifo", "level": "Info", "show_level": true, "show_log_origin": false}),
            ),
            (
                "PUT",
                "/metrics".into(),
                json!({"metrics_path": "metrics.fifo"}),
            ),
            (
                "PUT",
                "/machine-config".into(),
                json!({"vcpu_count": shape.vcpus, "mem_size_mib": shape.memory_mib, "smt": false}),
            ),
            (
                "PUT",
                "/boot-source".into(),
                json!({"kernel_image_path": self.config.kernel, "boot_args": self.boot_args(shape)}),
            ),
            (
                "PUT",
                "/drives/rootfs".into(),
                json!({"drive_id": "rootfs", "path_on_host": self.config.rootfs, "is_root_device": true, "is_read_only": true}),
            ),
            (
                "PUT",
                "/drives/scratch".into(),
                json!({"drive_id": "scratch", "path_on_host": "scratch.ext4", "is_root_device": false, "is_read_only": false}),
            ),
            (
                "PUT",
                "/vsock".into(),
                json!({"guest_cid": 3, "uds_path": "v.sock"}),
            ),
            (
                "PUT",
                "/actions".into(),
                json!({"action_type": "InstanceStart"}),
            ),
        ]
    }

    /// The API requests of a restore from a snapshot in `dir` (public for the contract tests).
    pub fn restore_requests(&self, dir: &Path) -> Vec<(&'static str, String, Value)> {
        vec![
            (
                "PUT",
                "/logger".into(),
                json!({"log_path": "log.fifo", "level": "Info", "show_level": true, "show_log_origin": false}),
            ),
            (
                "PUT",
                "/metrics".into(),
                json!({"metrics_path": "metrics.fifo"}),
            ),
            (
                "PUT",
                "/snapshot/load".into(),
                json!({
                    "snapshot_path": dir.join("vm.snap"),
                    "mem_backend": {"backend_type": "File", "backend_path": dir.join("vm.mem")},
                    "resume_vm": true,
                    "vsock_override": {"uds_path": "v.sock"},
                }),
            ),
        ]
    }

    /// Spawn Firecracker in `home` and wait until its API socket answers.
    async fn spawn(&self, home: &Path, id: &str) -> Result<(Child, ApiClient), String> {
        for fifo in ["log.fifo", "metrics.fifo"] {
            let p = std::ffi::CString::new(home.join(fifo).to_string_lossy().as_bytes())
                .map_err(|e| e.to_string())?;
            // SAFETY: a valid path string.
            if unsafe { libc::mkfifo(p.as_ptr(), 0o600) } != 0 {
                return Err(format!(
                    "mkfifo {fifo}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let out = std::fs::File::create(home.join("firecracker.out"))
            .map_err(|e| format!("creating firecracker.out: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let sock = home.join("api.sock");
        let mut child = Command::new(&self.config.firecracker)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(instance_id(id))
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.config.firecracker.display()))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(home.join(super::PID_FILE), pid.to_string());
        }
        let api = ApiClient::new(&sock);
        let start = Instant::now();
        loop {
            if tokio::net::UnixStream::connect(&sock).await.is_ok() {
                return Ok((child, api));
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "firecracker exited at start ({status}): {}",
                    tail(&home.join("firecracker.out"))
                ));
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill().await;
                return Err("firecracker's API socket did not appear within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Send requests in order; the first refusal ends it with a clear message.
    async fn send_all(
        api: &ApiClient,
        requests: Vec<(&'static str, String, Value)>,
    ) -> Result<(), ApiError> {
        for (method, path, body) in requests {
            api.call(method, &path, Some(&body)).await?;
        }
        Ok(())
    }

    /// Wait for the agent on the hybrid vsock, failing early if the VMM dies.
    async fn connect_agent(
        &self,
        home: &Path,
        child: &mut Child,
    ) -> Result<tokio::net::UnixStream, String> {
        let uds = home.join("v.sock");
        tokio::select! {
            r = vsock::connect_retry(&uds, super::AGENT_VSOCK_PORT, self.config.boot_timeout) => {
                r.map(|(s, _)| s).map_err(|e| format!("{e}; console: {}", tail(&home.join("firecracker.out"))))
            }
            s = child.wait() => Err(format!(
                "firecracker exited while the guest booted ({}): {}",
                s.map(|s| s.to_string()).unwrap_or_default(),
                tail(&home.join("firecracker.out"))
            )),
        }
    }

    /// Boot (or restore) a VM in a new home; returns the home, VMM and agent stream.
    async fn launch(
        &self,
        name: &str,
        shape: &VmShape,
        env: &[(String, String)],
        snapshot: Option<&Snapshot>,
    ) -> Result<(PathBuf, Child, tokio::net::UnixStream), String> {
        let id = super::vm_id(&format!("{}-{name}", self.config.server_id));
        let home = super::create_home(&self.config.base_dir, &id).map_err(|e| e.to_string())?;
        let result = async {
            let requests = match snapshot {
                Some(s) => {
                    copy_sparse(&s.dir.join("scratch.ext4"), &home.join("scratch.ext4"))?;
                    self.restore_requests(&s.dir)
                }
                None => {
                    super::make_scratch(&home, shape.scratch_bytes, env)
                        .map_err(|e| e.to_string())?;
                    self.boot_requests(shape)
                }
            };
            let (mut child, api) = self.spawn(&home, &id).await?;
            if let Err(e) = Self::send_all(&api, requests).await {
                let _ = child.kill().await;
                return Err(e.to_string());
            }
            match self.connect_agent(&home, &mut child).await {
                Ok(stream) => Ok((child, stream)),
                Err(e) => {
                    let _ = child.kill().await;
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((child, stream)) => Ok((home, child, stream)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&home);
                Err(e)
            }
        }
    }

    /// The snapshot of a shape: made on first use (boot a template, warm python and bash,
    /// pause, snapshot, kill). Public so that a server can make them ahead of sessions.
    pub async fn snapshot(&self, shape: &VmShape) -> Result<Snapshot, RuntimeError> {
        let key = format!(
            "{}c-{}m-{}s-{}p",
            shape.vcpus,
            shape.memory_mib,
            shape.scratch_bytes,
            shape.pids.unwrap_or(0)
        );
        let mut snaps = self.snapshots.lock().await;
        if let Some(s) = snaps.get(&key) {
            return Ok(s.clone());
        }
        let start = Instant::now();
        let err = |reason: String| RuntimeError::Start {
            session_id: format!("(snapshot template {key})"),
            reason,
        };
        let (home, mut child, stream) = self
            .launch(&format!("template-{key}"), shape, &self.config.env, None)
            .await
            .map_err(err)?;
        let made = async {
            let (r, w) = stream.into_split();
            let client = crate::AgentClient::new(Box::new(r), Box::new(w));
            tokio::time::timeout(self.config.boot_timeout, client.ready())
                .await
                .map_err(|_| "the template's agent did not get ready".to_string())?
                .map_err(|e| e.to_string())?;
            client
                .warmup(&["python", "bash"])
                .await
                .map_err(|e| format!("warming up the template: {e}"))?;
            drop(client);
            let api = ApiClient::new(home.join("api.sock"));
            api.patch("/vm", &json!({"state": "Paused"}))
                .await
                .map_err(|e| e.to_string())?;
            api.put(
                "/snapshot/create",
                &json!({"snapshot_type": "Full", "snapshot_path": home.join("vm.snap"), "mem_file_path": home.join("vm.mem")}),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        let _ = child.kill().await;
        let _ = child.wait().await;
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&home);
            return Err(err(e));
        }
        // The template's home stays as the snapshot directory (swept with the others).
        let _ = std::fs::remove_file(home.join(super::PID_FILE));
        let snap = Snapshot {
            dir: home,
            shape: shape.clone(),
            took: start.elapsed(),
        };
        tracing::info!(shape = %key, ms = snap.took.as_millis() as u64, dir = %snap.dir.display(), "firecracker snapshot made");
        snaps.insert(key, snap.clone());
        Ok(snap)
    }
}

/// Firecracker's `--id`: 1 to 64 characters of `[a-zA-Z0-9-]`.
pub fn instance_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if s.is_empty() {
        "sparkla".into()
    } else {
        s
    }
}

/// Copy a (sparse) file with `cp --sparse=always --reflink=auto`.
fn copy_sparse(from: &Path, to: &Path) -> Result<(), String> {
    let out = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| format!("running cp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "copying {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[async_trait]
impl Runtime for FirecrackerRuntime {
    fn name(&self) -> &'static str {
        RUNTIME
    }

    async fn prepare(&self, environment: Option<&str>) -> Result<(), RuntimeError> {
        match environment {
            None | Some("") | Some("default") => Ok(()),
            Some(name) => Err(RuntimeError::Environment {
                name: name.to_string(),
                reason: format!(
                    "the firecracker runtime has one environment, the guest image {}",
                    self.config.rootfs.display()
                ),
            }),
        }
    }

    async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
        self.prepare(spec.environment.as_deref()).await?;
        if !spec.mounts.is_empty() {
            return Err(RuntimeError::Refused(
                "the firecracker runtime does not support volume mounts".into(),
            ));
        }
        if spec.network {
            return Err(RuntimeError::Refused(
                "the firecracker runtime gives sessions no network".into(),
            ));
        }
        let shape = VmShape::from_limits(&spec.limits, &self.config.default_limits);
        let snapshot = if self.config.snapshots && spec.env.is_empty() {
            Some(self.snapshot(&shape).await?)
        } else {
            None
        };
        let mut env = self.config.env.clone();
        env.push(("SPARKLA_SESSION".into(), spec.session_id.clone()));
        env.extend(spec.env.iter().cloned());
        let started = Instant::now();
        let (home, child, stream) = self
            .launch(&spec.session_id, &shape, &env, snapshot.as_ref())
            .await
            .map_err(|reason| RuntimeError::Start {
                session_id: spec.session_id.clone(),
                reason,
            })?;
        tracing::debug!(session_id = %spec.session_id, restored = snapshot.is_some(), ms = started.elapsed().as_millis() as u64, home = %home.display(), "firecracker VM started");
        let (r, w) = stream.into_split();
        Ok(Box::new(VmInstance::new(
            "firecracker",
            "firecracker.out",
            spec.session_id,
            home,
            child,
            (Box::new(r), Box::new(w)),
        )))
    }

    async fn sweep(&self) -> Result<SweepReport, RuntimeError> {
        let prefix = format!("{}-", super::safe_id(&self.config.server_id));
        let base = self.config.base_dir.clone();
        self.snapshots.lock().await.clear();
        tokio::task::spawn_blocking(move || super::sweep_homes(&base, &prefix))
            .await
            .map_err(|e| RuntimeError::io("sweeping VM homes", std::io::Error::other(e)))
    }
}

/// One session's Firecracker VM.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_is_unavailable() {
        let mut c = FirecrackerConfig::new("t");
        c.check_kvm = false;
        c.firecracker = "/nonexistent/firecracker".into();
        let e = FirecrackerRuntime::new(c).unwrap_err();
        assert!(e.to_string().contains("firecracker binary"), "{e}");
    }

    #[test]
    fn instance_ids_are_what_firecracker_accepts() {
        assert_eq!(instance_id("srv_1-a.b"), "srv-1-a-b");
        assert_eq!(instance_id(&"x".repeat(100)).len(), 64);
        assert_eq!(instance_id(""), "sparkla");
    }

    #[test]
    fn boot_args_carry_the_agent_transport() {
        let rt = FirecrackerRuntime {
            config: FirecrackerConfig::new("t"),
            snapshots: Default::default(),
        };
        let shape = VmShape::from_limits(&Limits::default(), &rt.config.default_limits);
        let args = rt.boot_args(&shape);
        assert!(args.contains("init=/sbin/sparkla-init"), "{args}");
        assert!(args.contains("sparkla.listen=vsock:1024"), "{args}");
        assert!(
            args.starts_with("console=ttyS0 reboot=k panic=1 pci=off"),
            "{args}"
        );
    }
}
