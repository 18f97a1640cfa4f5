//! JSON-RPC 2.0 envelope, as spoken by Executa clients (and by the host to the agent).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// A request id: a string or a number, echoed unchanged. `Null` is used in error responses
/// to messages whose id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Num(serde_json::Number),
    Str(String),
    Null,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Num(n) => write!(f, "{n}"),
            Id::Str(s) => write!(f, "{s}"),
            Id::Null => write!(f, "null"),
        }
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::Str(s.to_string())
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id::Num(n.into())
    }
}

/// The error codes used by Executa (and so by Sparkla).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode;

impl ErrorCode {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object (also: JWT verification failed).
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal JSON-RPC error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// A server error (Executa's generic code).
    pub const SERVER_ERROR: i64 = -32000;
    /// The caller lacks the capability (Executa's `CapabilityError`).
    pub const CAPABILITY_ERROR: i64 = -32005;

    /// A short name for a code, for metrics labels and logs.
    pub fn name(code: i64) -> &'static str {
        match code {
            Self::PARSE_ERROR => "parse_error",
            Self::INVALID_REQUEST => "invalid_request",
            Self::METHOD_NOT_FOUND => "method_not_found",
            Self::INVALID_PARAMS => "invalid_params",
            Self::INTERNAL_ERROR => "internal_error",
            Self::SERVER_ERROR => "server_error",
            Self::CAPABILITY_ERROR => "capability_error",
            _ => "other",
        }
    }
}

/// The `error` member of a JSON-RPC response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
    pub fn parse_error(detail: impl fmt::Display) -> Self {
        Self::new(ErrorCode::PARSE_ERROR, format!("Parse error: {detail}"))
    }
    pub fn invalid_request(detail: impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::INVALID_REQUEST,
            format!("Invalid request: {detail}"),
        )
    }
    /// `Method not found: "x"`, Executa's wording.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            ErrorCode::METHOD_NOT_FOUND,
            format!("Method not found: \"{method}\""),
        )
    }
    /// `Invalid params: "node" is missing`, Executa's wording.
    pub fn invalid_params(detail: impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::INVALID_PARAMS,
            format!("Invalid params: {detail}"),
        )
    }
    pub fn server_error(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SERVER_ERROR, message)
    }
    pub fn capability_error(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::CAPABILITY_ERROR, message)
    }
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

impl fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ErrorObject {}

fn version() -> String {
    "2.0".to_string()
}

/// A request, or a notification when `id` is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default = "version")]
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl Request {
    pub fn new(id: impl Into<Id>, method: impl Into<String>, params: Value) -> Self {
        Self {
            jsonrpc: version(),
            id: Some(id.into()),
            method: method.into(),
            params: Some(params),
        }
    }

    /// Parse one message, telling a parse error (-32700) from an invalid request (-32600).
    /// The error carries the id when one could be read, so that it can be echoed.
    // The error is as large as the response it becomes; boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    pub fn parse(text: &str) -> Result<Request, (Id, ErrorObject)> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| (Id::Null, ErrorObject::parse_error(e)))?;
        Self::from_value(value)
    }

    /// Like [`Request::parse`], from an already parsed value.
    #[allow(clippy::result_large_err)]
    pub fn from_value(value: Value) -> Result<Request, (Id, ErrorObject)> {
        let id = match value.get("id") {
            Some(Value::String(s)) => Id::Str(s.clone()),
            Some(Value::Number(n)) => Id::Num(n.clone()),
            _ => Id::Null,
        };
        let Value::Object(map) = &value else {
            return Err((id, ErrorObject::invalid_request("expected a JSON object")));
        };
        match map.get("method") {
            Some(Value::String(_)) => {}
            Some(_) => {
                return Err((
                    id,
                    ErrorObject::invalid_request("\"method\" must be a string"),
                ))
            }
            None => return Err((id, ErrorObject::invalid_request("\"method\" is missing"))),
        }
        if let Some(v) = map.get("id") {
            if !(v.is_string() || v.is_number() || v.is_null()) {
                return Err((
                    Id::Null,
                    ErrorObject::invalid_request("\"id\" must be a string or a number"),
                ));
            }
        }
        if let Some(p) = map.get("params") {
            if !(p.is_object() || p.is_array() || p.is_null()) {
                return Err((
                    id,
                    ErrorObject::invalid_request("\"params\" must be an object or an array"),
                ));
            }
        }
        serde_json::from_value(value).map_err(|e| (id, ErrorObject::invalid_request(e)))
    }

    /// A named parameter (params given as an object), or the positional one at `index`.
    pub fn param(&self, name: &str, index: usize) -> Option<&Value> {
        match &self.params {
            Some(Value::Object(map)) => map.get(name),
            Some(Value::Array(list)) => list.get(index),
            _ => None,
        }
        .filter(|v| !v.is_null())
    }
}

/// A response: exactly one of `result` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default = "version")]
    pub jsonrpc: String,
    pub id: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
}

impl Response {
    pub fn ok(id: Id, result: Value) -> Self {
        Self {
            jsonrpc: version(),
            id,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(id: Id, error: ErrorObject) -> Self {
        Self {
            jsonrpc: version(),
            id,
            result: None,
            error: Some(error),
        }
    }
    /// The result, or the error.
    pub fn into_result(self) -> Result<Value, ErrorObject> {
        match (self.result, self.error) {
            (_, Some(e)) => Err(e),
            (Some(r), None) => Ok(r),
            (None, None) => Ok(Value::Null),
        }
    }
}

/// A notification: a request without an id. Executa's server notifications use the
/// level as the method (`info`, `warn`, `error`, `debug`) and `{message, node?}` as params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(default = "version")]
    pub jsonrpc: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl Notification {
    pub fn new(method: impl Into<String>, params: Value) -> Self {
        Self {
            jsonrpc: version(),
            method: method.into(),
            params: Some(params),
        }
    }
}

/// Any message on a JSON-RPC stream, as seen by a client (responses and notifications).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Message {
    Response(Response),
    Request(Request),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_echoed_unchanged() {
        for id in [json!("re1"), json!(42), json!(1.5)] {
            let req =
                Request::parse(&json!({"jsonrpc":"2.0","id":id,"method":"x"}).to_string()).unwrap();
            let resp = Response::ok(req.id.unwrap(), json!(true));
            assert_eq!(serde_json::to_value(&resp).unwrap()["id"], id);
        }
    }

    #[test]
    fn parse_errors_are_told_apart() {
        let (id, e) = Request::parse("{not json").unwrap_err();
        assert_eq!((id, e.code), (Id::Null, ErrorCode::PARSE_ERROR));
        let (id, e) = Request::parse(r#"{"id":7}"#).unwrap_err();
        assert_eq!((id, e.code), (Id::from(7), ErrorCode::INVALID_REQUEST));
        let (_, e) = Request::parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::INVALID_REQUEST);
        let (id, e) = Request::parse(r#"{"id":"a","method":3}"#).unwrap_err();
        assert_eq!((id, e.code), (Id::from("a"), ErrorCode::INVALID_REQUEST));
        let (_, e) = Request::parse(r#"{"id":"a","method":"m","params":3}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::INVALID_REQUEST);
    }

    #[test]
    fn params_by_name_or_position() {
        let r = Request::parse(r#"{"id":1,"method":"m","params":{"node":1}}"#).unwrap();
        assert_eq!(r.param("node", 0), Some(&json!(1)));
        let r = Request::parse(r#"{"id":1,"method":"m","params":[2]}"#).unwrap();
        assert_eq!(r.param("node", 0), Some(&json!(2)));
        assert_eq!(r.param("session", 1), None);
    }

    #[test]
    fn executa_error_wording() {
        assert_eq!(
            ErrorObject::method_not_found("x").message,
            "Method not found: \"x\""
        );
        assert_eq!(
            ErrorObject::invalid_params("\"node\" is missing").message,
            "Invalid params: \"node\" is missing"
        );
    }
}
