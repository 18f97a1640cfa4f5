//! A warm pool of ready instances, for any [`Runtime`].
//!
//! The pool keeps `size` instances per environment started, with their agent ready and the
//! kernels of `warm_languages` warmed up, refilled in the background. [`Pool::begin`] hands
//! one out at once when the session's spec is poolable: the same environment as a pool, no
//! mounts, no network, no extra environment variables, and the template's scratch size. A
//! session's cpu/memory/pids limits are applied at hand-out when the runtime supports it
//! ([`Instance::set_limits`]); otherwise only the template's limits are served from the
//! pool. Anything else is a cold start, with the same result type.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::{
    AgentClient, BoxRead, BoxWrite, Instance, InstanceSpec, InstanceState, Limits, Runtime,
    RuntimeError,
};

/// Configuration of a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Ready instances kept per environment (0 disables pooling).
    pub size: usize,
    /// Environments to keep warm (`None` = the runtime's default environment).
    pub environments: Vec<Option<String>>,
    /// Kernels started in pooled instances before hand-out.
    pub warm_languages: Vec<String>,
    /// The spec pooled instances are started with (its `session_id` and `environment` are
    /// ignored). Its limits are those of sessions that do not set their own.
    pub template: InstanceSpec,
    /// How long an agent may take to become ready.
    pub ready_timeout: Duration,
    /// Wait this long after a hand-out before starting its replacement, so that a new
    /// session's first executions do not compete with the refill for CPU. 0 = at once.
    pub refill_delay: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 2,
            environments: vec![None],
            warm_languages: vec!["python".into()],
            template: InstanceSpec::default(),
            ready_timeout: Duration::from_secs(30),
            refill_delay: Duration::ZERO,
        }
    }
}

struct Warm {
    instance: Box<dyn Instance>,
    client: AgentClient,
}

struct Inner {
    runtime: Arc<dyn Runtime>,
    config: PoolConfig,
    idle: Mutex<HashMap<Option<String>, VecDeque<Warm>>>,
    wake: Arc<Notify>,
    counter: AtomicU64,
}

/// A pool of warm instances in front of a runtime. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
    refill: Arc<tokio::task::JoinHandle<()>>,
}

/// Start an instance and connect to its agent; waits for `ready`.
pub async fn start_ready(
    runtime: &dyn Runtime,
    spec: InstanceSpec,
    ready_timeout: Duration,
) -> Result<(Box<dyn Instance>, AgentClient), RuntimeError> {
    let session_id = spec.session_id.clone();
    let mut instance = runtime.start(spec).await?;
    let Some((read, write)) = instance.take_stream() else {
        let _ = instance.stop().await;
        return Err(RuntimeError::Start {
            session_id,
            reason: "the instance has no stream to its agent".into(),
        });
    };
    let client = AgentClient::new(read, write);
    match tokio::time::timeout(ready_timeout, client.ready()).await {
        Ok(Ok(_)) => Ok((instance, client)),
        Ok(Err(e)) => {
            let state = instance.state().await;
            let _ = instance.stop().await;
            Err(RuntimeError::Start {
                session_id,
                reason: format!("{e} ({state:?})"),
            })
        }
        Err(_) => {
            let _ = instance.stop().await;
            Err(RuntimeError::Start {
                session_id,
                reason: format!(
                    "the agent was not ready within {}s",
                    ready_timeout.as_secs()
                ),
            })
        }
    }
}

impl Pool {
    /// Create the pool and start filling it in the background (needs a tokio runtime).
    pub fn new(runtime: Arc<dyn Runtime>, config: PoolConfig) -> Self {
        let inner = Arc::new(Inner {
            runtime,
            config,
            idle: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            counter: AtomicU64::new(0),
        });
        let refill = tokio::spawn(refill_loop(Arc::downgrade(&inner)));
        Self {
            inner,
            refill: Arc::new(refill),
        }
    }

    /// The runtime behind the pool.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.inner.runtime
    }

    /// Ready instances waiting, over all environments.
    pub fn idle(&self) -> usize {
        self.inner
            .idle
            .lock()
            .expect("pool lock")
            .values()
            .map(VecDeque::len)
            .sum()
    }

    /// Wait until every environment's pool is full (or `timeout` passes). For tests and
    /// benchmarks.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let want = self.inner.config.size * self.inner.config.environments.len();
        let deadline = tokio::time::Instant::now() + timeout;
        while self.idle() < want {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn poolable(&self, spec: &InstanceSpec) -> bool {
        let t = &self.inner.config.template;
        self.inner.config.size > 0
            && self.inner.config.environments.contains(&spec.environment)
            && spec.mounts.is_empty()
            && !spec.network
            && spec.env.is_empty()
            && spec.limits.scratch_bytes.or(t.limits.scratch_bytes) == t.limits.scratch_bytes
    }

    /// Begin a session: a warm instance from the pool when the spec allows, else a cold
    /// start. The agent is ready either way.
    pub async fn begin(
        &self,
        spec: InstanceSpec,
    ) -> Result<(Box<dyn Instance>, AgentClient), RuntimeError> {
        if self.poolable(&spec) {
            let t = &self.inner.config.template.limits;
            let limits = Limits {
                cpu_cores: spec.limits.cpu_cores.or(t.cpu_cores),
                memory_bytes: spec.limits.memory_bytes.or(t.memory_bytes),
                pids: spec.limits.pids.or(t.pids),
                scratch_bytes: t.scratch_bytes,
            };
            let same_limits = &limits == t;
            loop {
                let warm = {
                    let mut idle = self.inner.idle.lock().expect("pool lock");
                    idle.get_mut(&spec.environment)
                        .and_then(VecDeque::pop_front)
                };
                let Some(mut warm) = warm else { break };
                self.inner.wake.notify_one();
                let alive = !warm.client.is_closed()
                    && warm.instance.state().await == InstanceState::Running;
                if !alive {
                    let _ = warm.instance.stop().await;
                    continue;
                }
                let applied = if same_limits {
                    Ok(true)
                } else {
                    warm.instance.set_limits(&limits).await
                };
                match applied {
                    Ok(true) => {
                        tracing::debug!(session_id = %spec.session_id, pooled = %warm.instance.session_id(), "session from the warm pool");
                        return Ok((
                            Box::new(Renamed {
                                session_id: spec.session_id,
                                inner: warm.instance,
                            }),
                            warm.client,
                        ));
                    }
                    Ok(false) => {
                        // This runtime cannot change limits: keep the instance for a session
                        // with the template's limits, and start this one cold.
                        self.inner
                            .idle
                            .lock()
                            .expect("pool lock")
                            .entry(spec.environment.clone())
                            .or_default()
                            .push_front(warm);
                        break;
                    }
                    Err(e) => {
                        // E.g. a memory limit below what the warm kernel already uses.
                        tracing::debug!(error = %e, "a warm instance cannot take the session's limits");
                        let _ = warm.instance.stop().await;
                        break;
                    }
                }
            }
        }
        start_ready(
            self.inner.runtime.as_ref(),
            spec,
            self.inner.config.ready_timeout,
        )
        .await
    }

    /// Stop the refill and every idle instance.
    pub async fn shutdown(&self) {
        self.refill.abort();
        let all: Vec<Warm> = {
            let mut idle = self.inner.idle.lock().expect("pool lock");
            idle.drain().flat_map(|(_, q)| q).collect()
        };
        for mut w in all {
            let _ = w.instance.stop().await;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The last handle stops the refill; idle instances reclaim themselves when dropped.
        if Arc::strong_count(&self.refill) == 1 {
            self.refill.abort();
        }
    }
}

async fn refill_loop(inner: std::sync::Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let Some(pool) = inner.upgrade() else { return };
        let missing = pool.config.environments.iter().find(|env| {
            pool.idle
                .lock()
                .expect("pool lock")
                .get(*env)
                .map_or(0, VecDeque::len)
                < pool.config.size
        });
        let missing = missing.cloned();
        let Some(env) = missing else {
            let wake = pool.wake.clone();
            drop(pool);
            wake.notified().await;
            if let Some(pool) = inner.upgrade() {
                let delay = pool.config.refill_delay;
                drop(pool);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            continue;
        };
        let n = pool.counter.fetch_add(1, Ordering::Relaxed);
        let mut spec = pool.config.template.clone();
        spec.session_id = format!("pool-{}-{n}", std::process::id());
        spec.environment = env.clone();
        let runtime = pool.runtime.clone();
        let timeout = pool.config.ready_timeout;
        let languages = pool.config.warm_languages.clone();
        drop(pool);
        let started = async {
            let (instance, client) = start_ready(runtime.as_ref(), spec, timeout).await?;
            if !languages.is_empty() {
                let langs: Vec<&str> = languages.iter().map(String::as_str).collect();
                if let Err(e) = client.warmup(&langs).await {
                    tracing::warn!(error = %e, "warming up a pooled instance");
                }
            }
            Ok::<_, RuntimeError>(Warm { instance, client })
        }
        .await;
        let Some(pool) = inner.upgrade() else { return };
        match started {
            Ok(w) => {
                failures = 0;
                pool.idle
                    .lock()
                    .expect("pool lock")
                    .entry(env)
                    .or_default()
                    .push_back(w);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, environment = ?env, "refilling the pool failed");
                drop(pool);
                // Back off so that a broken environment does not spin.
                tokio::time::sleep(Duration::from_millis(100 << failures.min(7))).await;
            }
        }
    }
}

/// A pooled instance handed out under the session's id.
struct Renamed {
    session_id: String,
    inner: Box<dyn Instance>,
}

#[async_trait]
impl Instance for Renamed {
    fn session_id(&self) -> &str {
        &self.session_id
    }
    fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
        self.inner.take_stream()
    }
    async fn state(&self) -> InstanceState {
        self.inner.state().await
    }
    async fn oom_kills(&self) -> u64 {
        self.inner.oom_kills().await
    }
    async fn set_limits(&self, limits: &Limits) -> Result<bool, RuntimeError> {
        self.inner.set_limits(limits).await
    }
    async fn stop(&mut self) -> Result<(), RuntimeError> {
        self.inner.stop().await
    }
}

#[cfg(test)]
mod tests {
    //! The pool's logic over a fake runtime whose "agent" answers on an in-memory stream.
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    struct FakeRuntime {
        started: AtomicUsize,
        stopped: Arc<AtomicUsize>,
        can_set_limits: bool,
        die: std::sync::atomic::AtomicBool,
    }

    struct FakeInstance {
        id: String,
        stream: Mutex<Option<(BoxRead, BoxWrite)>>,
        stopped: Arc<AtomicUsize>,
        can_set_limits: bool,
        running: std::sync::atomic::AtomicBool,
    }

    /// A minimal agent: `ready`, then `true` to every request.
    fn fake_agent(die: bool) -> (BoxRead, BoxWrite) {
        let (host, agent) = tokio::io::duplex(64 * 1024);
        let (host_r, host_w) = tokio::io::split(host);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(agent);
            w.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"ready\",\"params\":{\"version\":\"0\",\"pid\":1,\"languages\":[]}}\n")
                .await
                .unwrap();
            if die {
                return;
            }
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                let resp = serde_json::json!({"jsonrpc":"2.0","id":v["id"],"result":true});
                let _ = w.write_all(format!("{resp}\n").as_bytes()).await;
            }
        });
        (Box::new(host_r), Box::new(host_w))
    }

    #[async_trait]
    impl Runtime for FakeRuntime {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn prepare(&self, _: Option<&str>) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, RuntimeError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(FakeInstance {
                id: spec.session_id,
                stream: Mutex::new(Some(fake_agent(self.die.load(Ordering::SeqCst)))),
                stopped: self.stopped.clone(),
                can_set_limits: self.can_set_limits,
                running: true.into(),
            }))
        }
        async fn sweep(&self) -> Result<crate::SweepReport, RuntimeError> {
            Ok(Default::default())
        }
    }

    #[async_trait]
    impl Instance for FakeInstance {
        fn session_id(&self) -> &str {
            &self.id
        }
        fn take_stream(&mut self) -> Option<(BoxRead, BoxWrite)> {
            self.stream.lock().unwrap().take()
        }
        async fn state(&self) -> InstanceState {
            if self.running.load(Ordering::SeqCst) {
                InstanceState::Running
            } else {
                InstanceState::Exited {
                    reason: "stopped".into(),
                }
            }
        }
        async fn oom_kills(&self) -> u64 {
            0
        }
        async fn set_limits(&self, _: &Limits) -> Result<bool, RuntimeError> {
            Ok(self.can_set_limits)
        }
        async fn stop(&mut self) -> Result<(), RuntimeError> {
            self.running.store(false, Ordering::SeqCst);
            self.stopped.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn fake(can_set_limits: bool) -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            started: AtomicUsize::new(0),
            stopped: Arc::new(AtomicUsize::new(0)),
            can_set_limits,
            die: false.into(),
        })
    }

    fn spec(id: &str) -> InstanceSpec {
        InstanceSpec {
            session_id: id.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn hands_out_refills_and_renames() {
        let rt = fake(true);
        let pool = Pool::new(rt.clone(), PoolConfig::default());
        assert!(pool.wait_full(Duration::from_secs(5)).await);
        assert_eq!(rt.started.load(Ordering::SeqCst), 2);
        let (inst, _c) = pool.begin(spec("s1")).await.unwrap();
        assert_eq!(inst.session_id(), "s1");
        assert_eq!(rt.started.load(Ordering::SeqCst), 2, "not from the pool");
        assert!(pool.wait_full(Duration::from_secs(5)).await);
        assert_eq!(rt.started.load(Ordering::SeqCst), 3, "refilled once");
        // Limits applied at hand-out by a runtime that can.
        let mut s = spec("s2");
        s.limits.memory_bytes = Some(1 << 30);
        pool.begin(s).await.unwrap();
        assert_eq!(rt.started.load(Ordering::SeqCst), 3);
        assert!(pool.wait_full(Duration::from_secs(5)).await);
        assert_eq!(rt.started.load(Ordering::SeqCst), 4, "refilled once");
        // Not poolable: cold, and the pool stays full.
        let mut s = spec("s3");
        s.network = true;
        pool.begin(s).await.unwrap();
        assert_eq!(rt.started.load(Ordering::SeqCst), 5);
        assert_eq!(pool.idle(), 2);
        pool.shutdown().await;
    }

    #[tokio::test]
    async fn keeps_warm_instances_a_runtime_cannot_limit() {
        let rt = fake(false);
        let pool = Pool::new(rt.clone(), PoolConfig::default());
        assert!(pool.wait_full(Duration::from_secs(5)).await);
        let mut s = spec("limited");
        s.limits.cpu_cores = Some(0.5);
        pool.begin(s).await.unwrap();
        // A cold start; the warm instances were kept, not stopped.
        assert_eq!(rt.started.load(Ordering::SeqCst), 3);
        assert_eq!(rt.stopped.load(Ordering::SeqCst), 0);
        assert_eq!(pool.idle(), 2);
        pool.shutdown().await;
        assert_eq!(rt.stopped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn dead_warm_instances_are_skipped() {
        let rt = fake(true);
        rt.die.store(true, Ordering::SeqCst);
        let pool = Pool::new(
            rt.clone(),
            PoolConfig {
                size: 1,
                ..Default::default()
            },
        );
        assert!(pool.wait_full(Duration::from_secs(5)).await);
        // The warm instance's agent is gone by now (its stream closed after `ready`).
        rt.die.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_inst, client) = pool.begin(spec("s")).await.unwrap();
        assert!(!client.is_closed(), "handed out a dead instance");
        assert!(
            rt.stopped.load(Ordering::SeqCst) >= 1,
            "dead instance not stopped"
        );
        pool.shutdown().await;
    }
}
