//! Stencila JSON: every CodeChunk and CodeExpression anywhere in the node tree, in document
//! order, gets `outputs` (chunks) or `output` (expressions), `errors` and `duration`.
//! Provenance goes in the root's `meta.sparkla`.

use serde_json::{json, Value};
use sparkla_protocol::nodes::node_type;
use std::path::Path;

use crate::document::{Chunk, ChunkResult, Document};
use crate::Error;

pub struct Stencila {
    root: Value,
    chunks: Vec<Chunk>,
    pointers: Vec<String>,
}

const RESULTS: [&str; 4] = ["outputs", "output", "errors", "duration"];

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn collect(v: &Value, pointer: String, found: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            let code = matches!(node_type(v), Some("CodeChunk" | "CodeExpression"));
            if code {
                found.push(pointer.clone());
            }
            for (k, x) in map {
                if code && RESULTS.contains(&k.as_str()) {
                    continue; // earlier results are not part of the document's code
                }
                collect(x, format!("{pointer}/{}", escape(k)), found);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                collect(x, format!("{pointer}/{i}"), found);
            }
        }
        _ => {}
    }
}

impl Stencila {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| Error::parse(path, &e))?;
        let mut pointers = Vec::new();
        collect(&root, String::new(), &mut pointers);
        let chunks = pointers
            .iter()
            .map(|p| {
                let node = root.pointer(p).expect("collected pointer");
                let kind = node_type(node).unwrap_or_default();
                let shown = if p.is_empty() { "/" } else { p.as_str() };
                let label = match node.get("id").and_then(Value::as_str) {
                    Some(id) => format!("{kind} {id:?} at {shown}"),
                    None => format!("{kind} at {shown}"),
                };
                Chunk {
                    label,
                    language: node
                        .get("programmingLanguage")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    code: node
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    expression: kind == "CodeExpression",
                }
            })
            .collect();
        Ok(Stencila {
            root,
            chunks,
            pointers,
        })
    }
}

impl Document for Stencila {
    fn format(&self) -> &'static str {
        "json"
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn node(&self, i: usize) -> Value {
        let mut node = self
            .root
            .pointer(&self.pointers[i])
            .cloned()
            .unwrap_or(json!({}));
        if let Some(obj) = node.as_object_mut() {
            for k in RESULTS {
                obj.remove(k);
            }
        }
        node
    }

    fn apply(&mut self, i: usize, result: &ChunkResult) {
        let mut node = result.node.clone();
        // Keep what the document had and the executor did not echo.
        if let (Some(new), Some(Value::Object(old))) = (
            node.as_object_mut(),
            self.root.pointer(&self.pointers[i]).cloned(),
        ) {
            for (k, v) in old {
                if !RESULTS.contains(&k.as_str()) && !new.contains_key(&k) {
                    new.insert(k, v);
                }
            }
        }
        if let Some(slot) = self.root.pointer_mut(&self.pointers[i]) {
            *slot = node;
        }
    }

    fn stored(&self, i: usize) -> Value {
        let node = self.root.pointer(&self.pointers[i]);
        let get = |k: &str| node.and_then(|n| n.get(k)).cloned();
        let mut out = json!({});
        if self.chunks[i].expression {
            if let Some(o) = get("output") {
                out["output"] = o;
            }
        } else {
            out["outputs"] = match get("outputs") {
                Some(Value::Array(a)) => Value::Array(a),
                _ => json!([]),
            };
        }
        if let Some(Value::Array(errors)) = get("errors") {
            if !errors.is_empty() {
                // Read both CodeError forms the same way.
                let errors: Vec<Value> = errors
                    .into_iter()
                    .map(|e| {
                        serde_json::from_value::<sparkla_protocol::CodeError>(e.clone())
                            .ok()
                            .and_then(|e| serde_json::to_value(e).ok())
                            .unwrap_or(e)
                    })
                    .collect();
                out["errors"] = Value::Array(errors);
            }
        }
        out
    }

    fn set_provenance(&mut self, provenance: Value) {
        if let Some(obj) = self.root.as_object_mut() {
            let meta = obj.entry("meta").or_insert_with(|| json!({}));
            if !meta.is_object() {
                *meta = json!({});
            }
            meta["sparkla"] = provenance;
        }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&self.root).expect("a JSON value serialises");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_code_anywhere_in_document_order() {
        let doc = json!({"type":"Article","content":[
            {"type":"Paragraph","content":["x = ",{"type":"CodeExpression","programmingLanguage":"python","text":"x"}]},
            {"type":"CodeChunk","id":"c1","programmingLanguage":"python","text":"x = 1","outputs":[{"type":"CodeChunk","text":"not me"}]},
            {"type":"Figure","content":[{"type":"CodeChunk","programmingLanguage":"bash","text":"echo"}]}
        ]});
        let mut s =
            Stencila::parse(Path::new("a.json"), &serde_json::to_vec(&doc).unwrap()).unwrap();
        let labels: Vec<&str> = s.chunks().iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "CodeExpression at /content/0/content/1",
                "CodeChunk \"c1\" at /content/1",
                "CodeChunk at /content/2/content/0"
            ]
        );
        assert!(s.node(1).get("outputs").is_none());
        assert_eq!(s.node(1)["id"], "c1");
        let node = json!({"type":"CodeChunk","id":"c1","programmingLanguage":"python","text":"x = 1","outputs":[1],"duration":0.5});
        s.apply(1, &ChunkResult::from_node(node, None));
        assert_eq!(s.stored(1), json!({"outputs":[1]}));
        s.set_provenance(json!({"v": 1}));
        let out: Value = serde_json::from_slice(&s.render()).unwrap();
        assert_eq!(out["content"][1]["duration"], 0.5);
        assert_eq!(out["meta"]["sparkla"]["v"], 1);
    }
}
