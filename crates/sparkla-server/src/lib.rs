//! The Sparkla server: a session manager ([`manager`]) that knows nothing of transport, and
//! the edge ([`edge`]) that speaks Executa (JSON-RPC 2.0 over WebSocket and HTTP, JWT) to
//! clients on one port.

pub mod config;
pub mod manager;

pub use config::Config;
pub use manager::{ClientInfo, ManagerConfig, ManagerError, SessionManager};
