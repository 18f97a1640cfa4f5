//! The effective session: `{...defaults, ...requested, ...claims.session}`, with every
//! request capped at its limit.

use serde_json::{Map, Value};
use sparkla_protocol::SoftwareSession;

/// The request/limit pairs of a SoftwareSession.
pub const PAIRS: &[(&str, &str)] = &[
    ("clientsRequest", "clientsLimit"),
    ("durationRequest", "durationLimit"),
    ("timeoutRequest", "timeoutLimit"),
    ("cpuRequest", "cpuLimit"),
    ("memoryRequest", "memoryLimit"),
    ("networkTransferRequest", "networkTransferLimit"),
];

/// Spread `defaults`, then `requested`, then the token's `claims` (so that a token caps what
/// its holder may ask for), then cap each request at its limit. Numbers must be finite and
/// not negative.
pub fn effective(
    defaults: &Map<String, Value>,
    requested: &Map<String, Value>,
    claims: Option<&Map<String, Value>>,
) -> Result<SoftwareSession, String> {
    let mut merged = defaults.clone();
    for (k, v) in requested {
        merged.insert(k.clone(), v.clone());
    }
    if let Some(claims) = claims {
        for (k, v) in claims {
            merged.insert(k.clone(), v.clone());
        }
    }
    for (req, lim) in PAIRS {
        for key in [req, lim] {
            if let Some(v) = merged.get(*key) {
                if v.is_null() {
                    merged.remove(*key);
                    continue;
                }
                match v.as_f64() {
                    Some(n) if n.is_finite() && n >= 0.0 => {}
                    _ => return Err(format!("\"{key}\" must be a number >= 0, not {v}")),
                }
            }
        }
        let limit = merged.get(*lim).and_then(Value::as_f64);
        let request = merged.get(*req).and_then(Value::as_f64);
        if let (Some(l), Some(r)) = (limit, request) {
            if r > l {
                merged.insert(req.to_string(), number(l));
            }
        }
    }
    merged.insert("type".into(), Value::String("SoftwareSession".into()));
    serde_json::from_value(Value::Object(merged)).map_err(|e| e.to_string())
}

fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

/// min(request, limit), either of which may be absent.
pub fn capped(request: Option<f64>, limit: Option<f64>) -> Option<f64> {
    match (request, limit) {
        (Some(r), Some(l)) => Some(r.min(l)),
        (r, l) => r.or(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn claims_override_requests_and_cap_them() {
        let defaults = map(json!({"cpuRequest":1,"memoryRequest":1,"durationRequest":21600}));
        let requested = map(json!({"cpuRequest":8,"memoryRequest":0.5,"cpuLimit":100}));
        let claims = map(json!({"cpuLimit":2,"durationLimit":60}));
        let s = effective(&defaults, &requested, Some(&claims)).unwrap();
        assert_eq!(s.cpu_request, Some(2.0));
        assert_eq!(s.cpu_limit, Some(2.0));
        assert_eq!(s.memory_request, Some(0.5));
        assert_eq!(s.duration_request, Some(60.0));
        let s = effective(&defaults, &requested, None).unwrap();
        assert_eq!(
            s.cpu_request,
            Some(8.0),
            "without claims the client's own limit applies"
        );
    }

    #[test]
    fn bad_numbers_are_refused() {
        let e = effective(&Map::new(), &map(json!({"cpuRequest":-1})), None).unwrap_err();
        assert!(e.contains("cpuRequest"), "{e}");
        let e = effective(&Map::new(), &map(json!({"memoryLimit":"lots"})), None).unwrap_err();
        assert!(e.contains("memoryLimit"), "{e}");
    }

    #[test]
    fn capped_takes_the_smaller() {
        assert_eq!(capped(Some(3.0), Some(2.0)), Some(2.0));
        assert_eq!(capped(None, Some(2.0)), Some(2.0));
        assert_eq!(capped(Some(1.0), None), Some(1.0));
        assert_eq!(capped(None, None), None);
    }
}
