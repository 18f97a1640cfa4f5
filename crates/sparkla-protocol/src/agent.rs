//! Messages between the host and the `sparkla-agent` that runs inside every session.
//!
//! # Framing
//!
//! **Newline-delimited JSON-RPC 2.0**, both ways: each message is one compact JSON object
//! (UTF-8, no raw newline inside, as every JSON encoder writes them) followed by `\n`.
//! The same framing is used on every transport: stdin/stdout, a Unix socket, vsock.
//! A line over the agent's limit (default [`MAX_LINE`]) is answered with an invalid-request
//! error and skipped; the agent keeps serving.
//!
//! # Methods (host → agent)
//!
//! | method | params | result |
//! |---|---|---|
//! | `execute` | [`ExecuteParams`]: `{job, node, outputLimit?}` | the node with `outputs`/`output`, `errors`, `duration` |
//! | `cancel` | [`CancelParams`]: `{job}` | `true` if the job was running or queued |
//! | `warmup` | [`WarmupParams`]: `{languages}` | `{language: null | error message}` |
//! | `status` | – | [`AgentStatus`] |
//! | `shutdown` | – | `true`; then the agent stops its kernels and exits |
//!
//! Requests are served concurrently: executions in different languages run in parallel,
//! executions in one language queue for its kernel in arrival order.
//!
//! # Notifications (agent → host)
//!
//! | method | params |
//! |---|---|
//! | `ready` | [`Ready`]: sent once, when the agent is ready for requests |
//! | `output` | [`Output`]: output of a running job, streamed as it is produced |
//! | `log` | [`Log`]: something the host should know (a kernel started, died, restarted) |

use crate::nodes::Extra;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The default maximum length of one message line, in bytes.
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// The default cap on the output of one execution, in bytes.
pub const DEFAULT_OUTPUT_LIMIT: usize = 10 * 1024 * 1024;

pub mod method {
    pub const EXECUTE: &str = "execute";
    pub const CANCEL: &str = "cancel";
    pub const WARMUP: &str = "warmup";
    pub const STATUS: &str = "status";
    pub const SHUTDOWN: &str = "shutdown";
    pub const READY: &str = "ready";
    pub const OUTPUT: &str = "output";
    pub const LOG: &str = "log";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteParams {
    /// A client-chosen id, used to cancel the execution and to tag its streamed output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// A CodeChunk or CodeExpression (any other node is returned unchanged).
    pub node: Value,
    /// Cap on this execution's output in bytes (default [`DEFAULT_OUTPUT_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelParams {
    pub job: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmupParams {
    pub languages: Vec<String>,
}

/// Which stream a piece of output text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of a running job's output: text from a stream, or a node (a value, an image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub job: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<Stream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Value>,
}

/// A language the agent knows, and whether its interpreter was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanguageInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub version: String,
    pub pid: u32,
    /// Languages whose interpreter was found.
    pub languages: Vec<LanguageInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelStatus {
    pub language: String,
    pub pid: u32,
    /// Executions this kernel has run.
    pub executions: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    pub languages: Vec<LanguageInfo>,
    pub kernels: Vec<KernelStatus>,
    /// Jobs running or queued.
    pub jobs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn execute_params_shape() {
        let p: ExecuteParams = serde_json::from_value(
            json!({"job":"j1","node":{"type":"CodeChunk","text":"1"},"outputLimit":10}),
        )
        .unwrap();
        assert_eq!(p.job.as_deref(), Some("j1"));
        assert_eq!(p.output_limit, Some(10));
        let o = Output {
            job: "j1".into(),
            stream: Some(Stream::Stderr),
            text: Some("x".into()),
            node: None,
        };
        assert_eq!(
            serde_json::to_value(o).unwrap(),
            json!({"job":"j1","stream":"stderr","text":"x"})
        );
    }
}
