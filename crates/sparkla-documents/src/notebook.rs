//! Jupyter notebooks (nbformat 4).
//!
//! Code cells are executed in the notebook's kernel language
//! (`metadata.kernelspec.language`, else `metadata.language_info.name`, else Python); a cell
//! starting with a `%%bash`, `%%sh`, `%%javascript`, `%%js` or `%%python` magic runs in that
//! language. Everything else (Markdown and raw cells, cell ids, metadata, attachments) is
//! kept as read. Outputs are written as Jupyter outputs: `stream`, `execute_result`
//! (`text/plain`, plus `application/json` for JSON values and `text/html` for tables),
//! `display_data` (`image/png` for figures) and `error`.

use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sparkla_protocol::agent::Stream;
use sparkla_protocol::nodes::node_type;
use std::path::Path;

use crate::document::{Chunk, ChunkResult, Document, Item};
use crate::render;
use crate::Error;

pub struct Notebook {
    nb: Value,
    chunks: Vec<Chunk>,
    /// The cell index of each chunk.
    cells: Vec<usize>,
    /// The language each chunk runs in (for `text/plain` renderings).
    languages: Vec<String>,
    execution_count: u64,
}

fn multiline(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

/// Text as Jupyter writes it: a list of lines, each keeping its newline.
fn lines(text: &str) -> Value {
    Value::Array(
        text.split_inclusive('\n')
            .map(|l| Value::String(l.to_string()))
            .collect(),
    )
}

const MAGICS: [(&str, &str); 6] = [
    ("%%bash", "bash"),
    ("%%sh", "bash"),
    ("%%javascript", "javascript"),
    ("%%js", "javascript"),
    ("%%python3", "python"),
    ("%%python", "python"),
];

/// IPython line magics that only configure display (`%matplotlib inline`, `%config …`) are
/// kept as comments in the code sent: figures are captured anyway. Other magics are not
/// IPython here and fail as the code they are.
fn strip_display_magics(language: &str, source: &str) -> String {
    if !render::is_python(language) || !source.contains('%') {
        return source.to_string();
    }
    source
        .split_inclusive('\n')
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with("%matplotlib") || t.starts_with("%config") {
                let indent = &line[..line.len() - t.len()];
                format!("{indent}pass  # {t}")
            } else {
                line.to_string()
            }
        })
        .collect()
}

impl Notebook {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let nb: Value = serde_json::from_slice(bytes).map_err(|e| Error::parse(path, &e))?;
        let invalid = |message: &str| Error::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        if !nb.is_object() {
            return Err(invalid("a notebook is a JSON object"));
        }
        match nb.get("nbformat").and_then(Value::as_u64) {
            Some(4) => {}
            Some(v) => {
                return Err(invalid(&format!(
                    "nbformat {v} is not supported (only nbformat 4; convert with `jupyter nbconvert --to notebook --nbformat 4`)"
                )))
            }
            None => return Err(invalid("missing \"nbformat\": not a Jupyter notebook")),
        }
        let cells = nb
            .get("cells")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("missing \"cells\" array"))?;
        let meta = nb.get("metadata");
        let language = meta
            .and_then(|m| m.pointer("/kernelspec/language"))
            .and_then(Value::as_str)
            .or_else(|| {
                meta.and_then(|m| m.pointer("/language_info/name"))
                    .and_then(Value::as_str)
            })
            .unwrap_or("python")
            .to_string();
        let mut chunks = Vec::new();
        let mut cell_index = Vec::new();
        let mut languages = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            let Some(kind) = cell.get("cell_type").and_then(Value::as_str) else {
                return Err(invalid(&format!("cell {} has no \"cell_type\"", i + 1)));
            };
            if kind != "code" {
                continue;
            }
            let source = multiline(cell.get("source"));
            let (lang, code) = match MAGICS.iter().find(|(m, _)| {
                source.starts_with(m)
                    && source[m.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| c == '\n' || c == ' ')
            }) {
                Some((m, l)) => {
                    let rest = &source[m.len()..];
                    let code = rest.split_once('\n').map(|x| x.1).unwrap_or("");
                    (l.to_string(), code.to_string())
                }
                None => (language.clone(), strip_display_magics(&language, &source)),
            };
            let label = match cell.get("id").and_then(Value::as_str) {
                Some(id) => format!("cell {} (id {id:?})", i + 1),
                None => format!("cell {}", i + 1),
            };
            chunks.push(Chunk {
                label,
                language: Some(lang.clone()),
                code,
                expression: false,
            });
            cell_index.push(i);
            languages.push(lang);
        }
        Ok(Notebook {
            nb,
            chunks,
            cells: cell_index,
            languages,
            execution_count: 0,
        })
    }

    fn cell(&self, i: usize) -> &Value {
        &self.nb["cells"][self.cells[i]]
    }

    fn cell_mut(&mut self, i: usize) -> &mut Value {
        &mut self.nb["cells"][self.cells[i]]
    }
}

/// Jupyter outputs for a chunk's result.
pub fn jupyter_outputs(result: &ChunkResult, language: &str, execution_count: u64) -> Vec<Value> {
    let mut outputs = Vec::new();
    for item in &result.items {
        match item {
            Item::Stream { stream, text } => outputs.push(json!({
                "output_type": "stream",
                "name": match stream { Stream::Stdout => "stdout", Stream::Stderr => "stderr" },
                "text": lines(text),
            })),
            Item::Value(v) => match node_type(v) {
                Some("ImageObject") => match render::image_data(v) {
                    Some((mime, bytes)) => {
                        let mut data = Map::new();
                        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
                        data.insert(
                            mime.clone(),
                            if mime == "image/svg+xml" {
                                lines(&String::from_utf8_lossy(&bytes))
                            } else {
                                Value::String(encoded)
                            },
                        );
                        data.insert("text/plain".into(), lines("<Figure>"));
                        outputs.push(json!({
                            "output_type": "display_data",
                            "data": data,
                            "metadata": {},
                        }));
                    }
                    None => outputs.push(json!({
                        "output_type": "display_data",
                        "data": {"text/plain": lines(v.get("contentUrl").and_then(Value::as_str).unwrap_or(""))},
                        "metadata": {},
                    })),
                },
                Some("Datatable") => outputs.push(json!({
                    "output_type": "execute_result",
                    "data": {
                        "text/html": lines(&render::html_table(v)),
                        "text/plain": lines(&render::text_table(v)),
                    },
                    "execution_count": execution_count,
                    "metadata": {},
                })),
                _ => {
                    let mut data = Map::new();
                    if !v.is_string() {
                        data.insert("application/json".into(), v.clone());
                    }
                    data.insert(
                        "text/plain".into(),
                        lines(&render::text_plain(v, language)),
                    );
                    outputs.push(json!({
                        "output_type": "execute_result",
                        "data": data,
                        "execution_count": execution_count,
                        "metadata": {},
                    }));
                }
            },
        }
    }
    for e in &result.errors {
        let ename = e.error_type.clone().unwrap_or_else(|| "Error".into());
        let trace: Vec<Value> = match &e.stack_trace {
            Some(t) if !t.is_empty() => t
                .trim_end_matches('\n')
                .split('\n')
                .map(|l| Value::String(l.to_string()))
                .collect(),
            _ => vec![Value::String(format!("{ename}: {}", e.error_message))],
        };
        outputs.push(json!({
            "output_type": "error",
            "ename": ename,
            "evalue": e.error_message,
            "traceback": trace,
        }));
    }
    outputs
}

/// An output in comparable form: no execution count, multiline strings joined, no empty
/// metadata.
fn canonical_output(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(obj) = o.as_object_mut() {
        obj.remove("execution_count");
        if obj
            .get("metadata")
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            obj.remove("metadata");
        }
        if let Some(t) = obj.get("text") {
            let joined = multiline(Some(t));
            obj.insert("text".into(), Value::String(joined));
        }
        if let Some(Value::Object(data)) = obj.get_mut("data") {
            for (mime, v) in data.iter_mut() {
                if !mime.contains("json") && v.is_array() {
                    *v = Value::String(multiline(Some(v)));
                }
            }
        }
    }
    o
}

impl Document for Notebook {
    fn format(&self) -> &'static str {
        "ipynb"
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn apply(&mut self, i: usize, result: &ChunkResult) {
        self.execution_count += 1;
        let n = self.execution_count;
        let outputs = jupyter_outputs(result, &self.languages[i], n);
        let cell = self.cell_mut(i);
        cell["outputs"] = Value::Array(outputs);
        cell["execution_count"] = json!(n);
    }

    fn stored(&self, i: usize) -> Value {
        Value::Array(
            self.cell(i)
                .get("outputs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(canonical_output)
                .collect(),
        )
    }

    fn set_provenance(&mut self, provenance: Value) {
        if !self.nb["metadata"].is_object() {
            self.nb["metadata"] = json!({});
        }
        self.nb["metadata"]["sparkla"] = provenance;
    }

    fn render(&self) -> Vec<u8> {
        // Jupyter's own layout: one-space indentation, a final newline.
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.nb
            .serialize(&mut ser)
            .expect("a JSON value serialises");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkla_protocol::CodeError;

    fn nb(cells: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}, "custom": 1},
            "cells": cells,
        }))
        .unwrap()
    }

    #[test]
    fn reads_code_cells_and_keeps_the_rest() {
        let bytes = nb(json!([
            {"cell_type":"markdown","id":"m1","metadata":{},"source":["# Title\n","text"]},
            {"cell_type":"code","id":"c1","metadata":{"tags":["x"]},"source":["x = 1\n","x"],"outputs":[],"execution_count":null},
            {"cell_type":"code","id":"c2","metadata":{},"source":"%%bash\necho hi","outputs":[],"execution_count":null},
            {"cell_type":"code","id":"c3","metadata":{},"source":"%matplotlib inline\nx = '%d' % 1","outputs":[],"execution_count":null},
        ]));
        let mut doc = Notebook::parse(Path::new("t.ipynb"), &bytes).unwrap();
        assert_eq!(doc.chunks().len(), 3);
        assert_eq!(
            doc.chunks()[2].code,
            "pass  # %matplotlib inline\nx = '%d' % 1"
        );
        assert_eq!(doc.chunks()[0].code, "x = 1\nx");
        assert_eq!(doc.chunks()[0].label, "cell 2 (id \"c1\")");
        assert_eq!(doc.chunks()[1].language.as_deref(), Some("bash"));
        assert_eq!(doc.chunks()[1].code, "echo hi");
        let result = ChunkResult {
            items: vec![
                Item::Stream {
                    stream: Stream::Stdout,
                    text: "a\nb\n".into(),
                },
                Item::Value(json!(1)),
            ],
            errors: vec![
                CodeError::new("ValueError", "bad").with_trace("Traceback\nValueError: bad\n")
            ],
            duration: 0.1,
            node: json!({}),
        };
        doc.apply(0, &result);
        let out: Value = serde_json::from_slice(&doc.render()).unwrap();
        let cell = &out["cells"][1];
        assert_eq!(cell["execution_count"], 1);
        assert_eq!(cell["metadata"]["tags"][0], "x");
        assert_eq!(
            cell["outputs"][0],
            json!({"output_type":"stream","name":"stdout","text":["a\n","b\n"]})
        );
        assert_eq!(cell["outputs"][1]["data"]["application/json"], 1);
        assert_eq!(cell["outputs"][1]["data"]["text/plain"], json!(["1"]));
        assert_eq!(
            cell["outputs"][2]["traceback"],
            json!(["Traceback", "ValueError: bad"])
        );
        assert_eq!(out["cells"][0]["source"], json!(["# Title\n", "text"]));
        assert_eq!(out["metadata"]["custom"], 1);
        // The comparable form ignores the execution count.
        let stored = doc.stored(0);
        assert_eq!(stored[0]["text"], "a\nb\n");
        assert!(stored[1].get("execution_count").is_none());
    }

    #[test]
    fn bad_notebooks_name_file_and_position() {
        let e = Notebook::parse(Path::new("bad.ipynb"), b"{\n  \"cells\": [,]\n}")
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("bad.ipynb") && msg.contains("line 2"), "{msg}");
        let e = Notebook::parse(Path::new("v3.ipynb"), br#"{"nbformat":3,"worksheets":[]}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("nbformat 3"), "{e}");
    }
}
