//! The Stencila Schema nodes that Sparkla reads and writes.
//!
//! Every node keeps the properties it does not model in `extra` (flattened), so a node a
//! client sends comes back with everything it sent, plus what Sparkla filled in.
//!
//! `CodeError` is read in both of its historical forms: `kind`/`message`/`trace` (Stencila
//! Schema <= 0.34, what the original Sparkla's executors emitted) and
//! `errorType`/`errorMessage`/`stackTrace` (>= 0.35). Sparkla always **emits the new form**.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Properties a node carries that Sparkla does not model.
pub type Extra = Map<String, Value>;

macro_rules! type_name {
    ($fn:ident, $name:literal) => {
        fn $fn() -> String {
            $name.to_string()
        }
    };
}
type_name!(t_session, "SoftwareSession");
type_name!(t_environment, "SoftwareEnvironment");
type_name!(t_volume, "VolumeMount");
type_name!(t_chunk, "CodeChunk");
type_name!(t_expression, "CodeExpression");
type_name!(t_error, "CodeError");
type_name!(t_image, "ImageObject");
type_name!(t_datatable, "Datatable");
type_name!(t_column, "DatatableColumn");

/// The status of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    #[default]
    Unknown,
    Starting,
    Started,
    Stopping,
    Stopped,
    Failed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// A compute session. Limits are in cores (cpu), GiB (memory, network transfer) and
/// seconds (duration, timeout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SoftwareSession {
    #[serde(rename = "type", default = "t_session")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<SoftwareEnvironment>,
    /// `{type: "Date", value: ISO}` or an ISO string; kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_start: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_end: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_transfer_request: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_transfer_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Default for SoftwareSession {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("empty session")
    }
}

/// The environment of a session: for the sandbox an environment directory (or the host's
/// system directories), for Docker an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SoftwareEnvironment {
    #[serde(rename = "type", default = "t_environment")]
    pub type_: String,
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub extra: Extra,
}

impl SoftwareEnvironment {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            type_: t_environment(),
            name: name.into(),
            extra: Extra::new(),
        }
    }
}

/// A host directory mounted into a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    #[serde(rename = "type", default = "t_volume")]
    pub type_: String,
    pub mount_destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_options: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl VolumeMount {
    /// Whether the mount was asked to be read-only (`"ro"` in `mountOptions`).
    pub fn read_only(&self) -> bool {
        self.mount_options
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "ro")
    }
}

/// A chunk of code: its outputs, errors and duration (seconds) are filled in by execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeChunk {
    #[serde(rename = "type", default = "t_chunk")]
    pub type_: String,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programming_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<CodeError>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl CodeChunk {
    pub fn new(language: &str, text: &str) -> Self {
        Self {
            type_: t_chunk(),
            text: text.into(),
            programming_language: Some(language.into()),
            outputs: None,
            errors: None,
            duration: None,
            extra: Extra::new(),
        }
    }
}

/// An expression: its `output` (a single node) is filled in by execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeExpression {
    #[serde(rename = "type", default = "t_expression")]
    pub type_: String,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programming_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<CodeError>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// An error in code or in its execution. Read in the old (`kind`, `message`, `trace`) and the
/// new (`errorType`, `errorMessage`, `stackTrace`) forms; always written in the new form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeError {
    #[serde(rename = "type", default = "t_error")]
    pub type_: String,
    #[serde(default, alias = "kind", skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, alias = "message")]
    pub error_message: String,
    #[serde(default, alias = "trace", skip_serializing_if = "Option::is_none")]
    pub stack_trace: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl CodeError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_: t_error(),
            error_type: Some(error_type.into()),
            error_message: message.into(),
            stack_trace: None,
            extra: Extra::new(),
        }
    }
    pub fn with_trace(mut self, trace: impl Into<String>) -> Self {
        self.stack_trace = Some(trace.into());
        self
    }
}

/// An image, usually a `data:image/png;base64,` URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageObject {
    #[serde(rename = "type", default = "t_image")]
    pub type_: String,
    pub content_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A table (e.g. a pandas DataFrame), column by column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Datatable {
    #[serde(rename = "type", default = "t_datatable")]
    pub type_: String,
    #[serde(default)]
    pub columns: Vec<DatatableColumn>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatatableColumn {
    #[serde(rename = "type", default = "t_column")]
    pub type_: String,
    pub name: String,
    #[serde(default)]
    pub values: Vec<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The `type` of a node held as JSON, if it has one.
pub fn node_type(node: &Value) -> Option<&str> {
    node.get("type").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_properties_survive_a_round_trip() {
        let sent = json!({
            "type": "CodeChunk", "text": "1+1", "programmingLanguage": "python",
            "id": "c1", "label": "Figure 1", "meta": {"a": [1, 2]}, "imports": ["os"]
        });
        let chunk: CodeChunk = serde_json::from_value(sent.clone()).unwrap();
        let back = serde_json::to_value(&chunk).unwrap();
        assert_eq!(back, sent);

        let session = json!({"type":"SoftwareSession","cpuRequest":1.5,"custom":true,
            "environment":{"type":"SoftwareEnvironment","name":"x","adds":["y"]},
            "volumeMounts":[{"type":"VolumeMount","mountDestination":"/d","mountOptions":["ro"],"z":1}]});
        let s: SoftwareSession = serde_json::from_value(session.clone()).unwrap();
        assert!(s.volume_mounts.as_ref().unwrap()[0].read_only());
        assert_eq!(serde_json::to_value(&s).unwrap(), session);
    }

    #[test]
    fn code_error_reads_both_forms_and_writes_the_new_one() {
        let old: CodeError = serde_json::from_value(
            json!({"type":"CodeError","kind":"ValueError","message":"bad","trace":"tb"}),
        )
        .unwrap();
        let new: CodeError = serde_json::from_value(
            json!({"type":"CodeError","errorType":"ValueError","errorMessage":"bad","stackTrace":"tb"}),
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(
            serde_json::to_value(&old).unwrap(),
            json!({"type":"CodeError","errorType":"ValueError","errorMessage":"bad","stackTrace":"tb"})
        );
    }

    #[test]
    fn session_status_is_lowercase() {
        let s: SoftwareSession =
            serde_json::from_value(json!({"type":"SoftwareSession","status":"started"})).unwrap();
        assert_eq!(s.status, Some(SessionStatus::Started));
        assert!(serde_json::from_value::<SoftwareSession>(json!({"status":"bogus"})).is_err());
    }
}
