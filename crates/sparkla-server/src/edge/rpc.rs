//! JSON-RPC methods: parameters in, manager commands, results or Executa errors out.

use serde_json::{json, Value};
use sparkla_protocol::{ErrorObject, Id, Request, Response};

use super::AppState;
use crate::manager::{ClientInfo, ManagerError};

/// The methods served (also the bare HTTP routes).
pub const METHODS: &[&str] = &[
    "manifest", "begin", "execute", "end", "cancel", "decode", "encode", "compile", "build",
];

fn required<'a>(req: &'a Request, name: &str, index: usize) -> Result<&'a Value, ErrorObject> {
    req.param(name, index)
        .ok_or_else(|| ErrorObject::invalid_params(format!("\"{name}\" is missing")))
}

fn manager_error(e: ManagerError) -> ErrorObject {
    ErrorObject::new(e.code(), e.to_string())
}

/// Run one request for `client`.
pub async fn call(
    state: &AppState,
    client: &ClientInfo,
    req: &Request,
) -> Result<Value, ErrorObject> {
    let m = &state.manager;
    match req.method.as_str() {
        "manifest" => Ok(state.manifest()),
        "begin" => {
            let node = required(req, "node", 0)?.clone();
            m.begin(client, node).await.map_err(manager_error)
        }
        "execute" => {
            let node = required(req, "node", 0)?.clone();
            let session = req.param("session", 1).cloned();
            let job = match req.param("job", 2) {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(_) => {
                    return Err(ErrorObject::invalid_params(
                        "\"job\" must be a string or a number",
                    ))
                }
            };
            m.execute(client, node, session, job)
                .await
                .map_err(manager_error)
        }
        "end" => {
            let node = required(req, "node", 0)?.clone();
            m.end(client, node).await.map_err(manager_error)
        }
        "cancel" => {
            let job = match required(req, "job", 0)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(ErrorObject::invalid_params(
                        "\"job\" must be a string or a number",
                    ))
                }
            };
            m.cancel(client, &job)
                .await
                .map(Value::Bool)
                .map_err(manager_error)
        }
        "decode" => {
            let content = required(req, "content", 0)?;
            check_format(req, 1)?;
            let text = content
                .as_str()
                .ok_or_else(|| ErrorObject::invalid_params("\"content\" must be a string"))?;
            serde_json::from_str(text)
                .map_err(|e| ErrorObject::invalid_params(format!("\"content\" is not JSON: {e}")))
        }
        "encode" => {
            let node = required(req, "node", 0)?;
            check_format(req, 1)?;
            Ok(Value::String(node.to_string()))
        }
        "compile" | "build" => Ok(required(req, "node", 0)?.clone()),
        other => Err(ErrorObject::method_not_found(other)),
    }
}

fn check_format(req: &Request, index: usize) -> Result<(), ErrorObject> {
    match req.param("format", index) {
        None => Ok(()),
        Some(Value::String(f)) if f == "json" => Ok(()),
        Some(f) => Err(ErrorObject::invalid_params(format!(
            "\"format\" {f} is not supported (only \"json\")"
        ))),
    }
}

/// Handle one message (text) and give the response to send, if any (notifications get
/// none). Counts errors by code.
pub async fn handle(state: &AppState, client: &ClientInfo, text: &str) -> Option<Response> {
    let req = match Request::parse(text) {
        Ok(r) => r,
        Err((id, e)) => return Some(error_response(id, e)),
    };
    let id = req.id.clone();
    let result = call(state, client, &req).await;
    let id = id?;
    Some(match result {
        Ok(v) => Response::ok(id, v),
        Err(e) => error_response(id, e),
    })
}

pub fn error_response(id: Id, e: ErrorObject) -> Response {
    metrics::counter!("sparkla_errors_total", "code" => sparkla_protocol::ErrorCode::name(e.code))
        .increment(1);
    Response::err(id, e)
}

/// The `capabilities` of the manifest: JSON Schemas of the params each method accepts.
pub fn capabilities(free_cpu: f64, free_memory: f64) -> Value {
    json!({
        "manifest": true,
        "decode": {"required": ["content"], "properties": {"content": {"type": "string"}, "format": {"const": "json"}}},
        "encode": {"required": ["node"], "properties": {"node": true, "format": {"const": "json"}}},
        "begin": {
            "required": ["node"],
            "properties": {"node": {
                "required": ["type"],
                "properties": {
                    "type": {"const": "SoftwareSession"},
                    "cpuRequest": {"type": "number", "minimum": 0, "maximum": free_cpu},
                    "memoryRequest": {"type": "number", "minimum": 0, "maximum": free_memory}
                }
            }}
        },
        "execute": {
            "required": ["node"],
            "properties": {
                "node": {"required": ["type"], "properties": {"type": {"enum": ["CodeChunk", "CodeExpression"]}}},
                "session": {"properties": {"type": {"const": "SoftwareSession"}, "id": {"type": "string"}}},
                "job": {"type": "string"}
            }
        },
        "end": {"required": ["node"], "properties": {"node": {"properties": {"type": {"const": "SoftwareSession"}}}}},
        "cancel": {"required": ["job"], "properties": {"job": {"type": "string"}}}
    })
}
