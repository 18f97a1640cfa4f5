//! The Sparkla server: a session manager ([`manager`]) that knows nothing of transport, and
//! the edge ([`edge`]) that speaks Executa (JSON-RPC 2.0 over WebSocket and HTTP, JWT) to
//! clients on one port.

pub mod config;
pub mod edge;
pub mod manager;
pub mod runtimes;

pub use config::Config;
pub use edge::{manager_for, Server};
pub use manager::{ClientInfo, ManagerConfig, ManagerError, SessionManager};
pub use runtimes::runtime_for;
