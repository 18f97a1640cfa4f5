//! Canonical JSON, digests, and readable diffs of outputs.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Compact JSON with object keys sorted, recursively (so equal values give equal bytes).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Lowercase hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of the canonical JSON of a value.
pub fn digest(v: &Value) -> String {
    format!("sha256:{}", sha256_hex(canonical_json(v).as_bytes()))
}

/// A readable, line-oriented rendering of a value for diffs: strings as their lines, long
/// base64 payloads as their size and digest, objects as `key: value` with indentation.
pub fn readable(v: &Value) -> String {
    let mut out = String::new();
    write_readable(v, 0, &mut out);
    out
}

fn write_readable(v: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match v {
        Value::String(s) => {
            if s.len() > 512 && !s.contains(char::is_whitespace) {
                out.push_str(&format!(
                    "{pad}<{} bytes, sha256 {}>\n",
                    s.len(),
                    &sha256_hex(s.as_bytes())[..16]
                ));
            } else if s.is_empty() {
                out.push_str(&format!("{pad}\"\"\n"));
            } else {
                for line in s.split_inclusive('\n') {
                    out.push_str(&pad);
                    out.push_str(line);
                    if !line.ends_with('\n') {
                        out.push_str("⏎̸\n"); // no final newline
                    }
                }
            }
        }
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str(&format!("{pad}[]\n"));
            }
            for (i, x) in items.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]\n"));
                write_readable(x, depth + 1, out);
            }
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for k in keys {
                match &map[k.as_str()] {
                    Value::String(s) if !s.contains('\n') && s.len() <= 512 => {
                        out.push_str(&format!("{pad}{k}: {s}\n"))
                    }
                    x @ (Value::Number(_) | Value::Bool(_) | Value::Null) => {
                        out.push_str(&format!("{pad}{k}: {x}\n"))
                    }
                    x => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        write_readable(x, depth + 1, out);
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

/// A unified diff of the readable forms of the stored and the re-executed outputs.
pub fn diff(stored: &Value, fresh: &Value) -> String {
    let a = readable(stored);
    let b = readable(fresh);
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header("stored", "re-executed")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_and_digest_ignores_order() {
        let a = json!({"b": 1, "a": [{"y": 2, "x": "s"}]});
        let b = json!({"a": [{"x": "s", "y": 2}], "b": 1});
        assert_eq!(canonical_json(&a), r#"{"a":[{"x":"s","y":2}],"b":1}"#);
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&json!({"a": [], "b": 1})));
        assert!(digest(&a).starts_with("sha256:") && digest(&a).len() == 7 + 64);
    }

    #[test]
    fn diff_shows_changed_lines() {
        let d = diff(&json!(["hi\n", 42]), &json!(["ho\n", 42]));
        assert!(d.contains("-  hi") && d.contains("+  ho"), "{d}");
        assert!(diff(&json!([1]), &json!([1])).is_empty());
    }
}
