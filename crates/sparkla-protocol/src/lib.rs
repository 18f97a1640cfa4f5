//! Wire types of Sparkla. Serde types only: no I/O, no async runtime.
//!
//! - [`jsonrpc`]: the JSON-RPC 2.0 envelope and the Executa error codes.
//! - [`nodes`]: the Stencila Schema nodes that Sparkla reads and writes. Every node keeps the
//!   properties it does not model (in `extra`), so a client's node comes back with everything
//!   it sent.
//! - [`agent`]: the messages between the host and the `sparkla-agent` inside each session,
//!   and their framing (newline-delimited JSON-RPC).

pub mod agent;
pub mod jsonrpc;
pub mod nodes;

pub use jsonrpc::{ErrorCode, ErrorObject, Id, Notification, Request, Response};
pub use nodes::{
    CodeChunk, CodeError, CodeExpression, Datatable, DatatableColumn, ImageObject, SessionStatus,
    SoftwareEnvironment, SoftwareSession, VolumeMount,
};

/// The version of this crate, reported by the agent and the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
