//! Building the configured runtime.

use sparkla_runtime::docker::{DockerConfig, DockerRuntime};
use sparkla_runtime::process::ProcessRuntime;
use sparkla_runtime::sandbox::{SandboxConfig, SandboxRuntime};
use sparkla_runtime::vm::firecracker::{FirecrackerConfig, FirecrackerRuntime};
use sparkla_runtime::vm::qemu::{QemuConfig, QemuRuntime};
use sparkla_runtime::Runtime;
use std::sync::Arc;

use crate::config::Config;

/// The runtime named by `config.runtime`, set up (sweeping what a crashed server of the
/// same kind left behind).
pub async fn runtime_for(config: &Config) -> anyhow::Result<Arc<dyn Runtime>> {
    let runtime: Arc<dyn Runtime> = match config.runtime.as_str() {
        "sandbox" => Arc::new(SandboxRuntime::new(SandboxConfig {
            agent: config.agent.clone(),
            ..Default::default()
        })?),
        "docker" => {
            let mut dc = DockerConfig::new(format!("sparkla-{}-{}", hostname(), config.port));
            dc.agent = config.agent.clone();
            Arc::new(DockerRuntime::new(dc).await?)
        }
        "process" => {
            tracing::warn!(
                "the process runtime does not isolate sessions: use it only for trusted code"
            );
            Arc::new(ProcessRuntime::new(config.agent.clone())?)
        }
        "firecracker" => Arc::new(FirecrackerRuntime::new(FirecrackerConfig::new(format!(
            "sparkla-{}-{}",
            hostname(),
            config.port
        )))?),
        "qemu" => Arc::new(
            QemuRuntime::new(QemuConfig::new(format!(
                "sparkla-{}-{}",
                hostname(),
                config.port
            )))
            .await?,
        ),
        other => anyhow::bail!("unknown runtime {other:?}"),
    };
    match runtime.sweep().await {
        Ok(report) if report != Default::default() => {
            tracing::info!(?report, "reclaimed what a previous server left behind")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "sweep failed"),
    }
    Ok(runtime)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
