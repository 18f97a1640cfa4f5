//! What every document format provides: its chunks, a place for their results, the stored
//! outputs in a comparable form, provenance, and its rendering.

use serde_json::{json, Value};
use sparkla_protocol::agent::Stream;
use sparkla_protocol::CodeError;
use std::path::PathBuf;

/// One piece of code to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// How the user finds it: `cell "a1b2"`, `cell 3`, `chunk 2 (line 14)`, `/content/3`.
    pub label: String,
    /// The language as written (`python`, `py`, `bash`…); `None` when the document says none.
    pub language: Option<String>,
    pub code: String,
    /// A CodeExpression (one value) rather than a CodeChunk.
    pub expression: bool,
}

/// One output of an execution, in the order it was produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Text written to stdout or stderr (consecutive pieces of one stream merged).
    Stream { stream: Stream, text: String },
    /// A value: JSON, or a Stencila node (ImageObject, Datatable).
    Value(Value),
}

/// What executing one chunk gave.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkResult {
    pub items: Vec<Item>,
    pub errors: Vec<CodeError>,
    /// Seconds.
    pub duration: f64,
    /// The executed node as the agent/server returned it (CodeChunk/CodeExpression).
    pub node: Value,
}

impl ChunkResult {
    /// A result that is only an error (the chunk could not be sent, the session died…).
    pub fn error(node: Value, error: CodeError) -> Self {
        let mut node = node;
        if let Some(obj) = node.as_object_mut() {
            obj.insert("errors".into(), json!([error]));
        }
        ChunkResult {
            items: Vec::new(),
            errors: vec![error],
            duration: 0.0,
            node,
        }
    }

    /// Build the items from the streamed output (when the transport gave it), else from the
    /// node's `outputs` (strings then count as stdout) or `output`.
    pub fn from_node(node: Value, streamed: Option<Vec<Item>>) -> Self {
        let errors: Vec<CodeError> = node
            .get("errors")
            .and_then(|e| serde_json::from_value(e.clone()).ok())
            .unwrap_or_default();
        let duration = node.get("duration").and_then(Value::as_f64).unwrap_or(0.0);
        let expression = sparkla_protocol::nodes::node_type(&node) == Some("CodeExpression");
        let items = match streamed {
            Some(items) if !expression => items,
            _ => {
                let mut items = Vec::new();
                if expression {
                    if let Some(v) = node.get("output") {
                        items.push(Item::Value(v.clone()));
                    }
                } else {
                    for v in node
                        .get("outputs")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        match v {
                            Value::String(s) => push_text(&mut items, Stream::Stdout, s),
                            other => items.push(Item::Value(other.clone())),
                        }
                    }
                }
                items
            }
        };
        ChunkResult {
            items,
            errors,
            duration,
            node,
        }
    }
}

/// Append text to the items, merging with the last item when it is the same stream.
pub fn push_text(items: &mut Vec<Item>, stream: Stream, text: &str) {
    if let Some(Item::Stream { stream: s, text: t }) = items.last_mut() {
        if *s == stream {
            t.push_str(text);
            return;
        }
    }
    items.push(Item::Stream {
        stream,
        text: text.to_string(),
    });
}

/// A file written beside the output document (e.g. a figure of a Markdown document).
#[derive(Debug, Clone, PartialEq)]
pub struct SideFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// A document being executed.
pub trait Document: Send {
    /// The format's name (`ipynb`, `md`, `json`).
    fn format(&self) -> &'static str;
    /// The chunks, in document order.
    fn chunks(&self) -> &[Chunk];
    /// The node to send for chunk `i` (a CodeChunk or CodeExpression without results).
    fn node(&self, i: usize) -> Value {
        let c = &self.chunks()[i];
        let mut node = json!({
            "type": if c.expression { "CodeExpression" } else { "CodeChunk" },
            "text": c.code,
        });
        if let Some(lang) = &c.language {
            node["programmingLanguage"] = json!(lang);
        }
        node
    }
    /// Store the result of chunk `i` in the document.
    fn apply(&mut self, i: usize, result: &ChunkResult);
    /// The outputs stored for chunk `i`, in a canonical form that leaves out what may differ
    /// between two faithful executions (durations, execution counts, timestamps).
    fn stored(&self, i: usize) -> Value;
    /// Record execution provenance in the document's metadata.
    fn set_provenance(&mut self, provenance: Value);
    /// The document's bytes.
    fn render(&self) -> Vec<u8>;
    /// Files to write beside the document (figures), relative paths resolved already.
    fn side_files(&self) -> Vec<SideFile> {
        Vec::new()
    }
    /// Files that earlier executions wrote beside the document and that the new document no
    /// longer links (removed after it is written).
    fn obsolete_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}
