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
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 2,
            environments: vec![None],
            warm_languages: vec!["python".into()],
            template: InstanceSpec::default(),
            ready_timeout: Duration::from_secs(30),
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
                let fits = alive
                    && (same_limits || matches!(warm.instance.set_limits(&limits).await, Ok(true)));
                if fits {
                    tracing::debug!(session_id = %spec.session_id, pooled = %warm.instance.session_id(), "session from the warm pool");
                    return Ok((
                        Box::new(Renamed {
                            session_id: spec.session_id,
                            inner: warm.instance,
                        }),
                        warm.client,
                    ));
                }
                let _ = warm.instance.stop().await;
                if alive {
                    // The limits cannot be applied: this pool cannot serve the spec.
                    break;
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
