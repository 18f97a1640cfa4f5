//! Rendering output values as text, HTML and Markdown.

use base64::Engine;
use serde_json::Value;
use sparkla_protocol::nodes::node_type;

/// A value's `text/plain`: strings as they are (the kernels already give reprs as strings),
/// Python-style literals for Python, JSON otherwise; tables as aligned text.
pub fn text_plain(v: &Value, language: &str) -> String {
    match node_type(v) {
        Some("Datatable") => return text_table(v),
        Some("ImageObject") => return "<Figure>".into(),
        _ => {}
    }
    match v {
        Value::String(s) => s.clone(),
        _ if is_python(language) => py_repr(v),
        other => other.to_string(),
    }
}

pub fn is_python(language: &str) -> bool {
    matches!(
        language.to_ascii_lowercase().as_str(),
        "python" | "python3" | "py"
    )
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n");
            format!("'{escaped}'")
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, x)| format!("{}: {}", py_repr(&Value::String(k.clone())), py_repr(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The columns of a Datatable: (name, cell texts).
fn columns(v: &Value) -> Vec<(String, Vec<String>)> {
    v.get("columns")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let values = c
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(cell_text)
                .collect();
            (name, values)
        })
        .collect()
}

fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "NaN".into(),
        other => other.to_string(),
    }
}

fn rows(cols: &[(String, Vec<String>)]) -> usize {
    cols.iter().map(|(_, v)| v.len()).max().unwrap_or(0)
}

/// An aligned text table with a row index, like pandas prints.
pub fn text_table(v: &Value) -> String {
    let cols = columns(v);
    let n = rows(&cols);
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec![String::new()];
    header.extend(cols.iter().map(|(name, _)| name.clone()));
    table.push(header);
    for r in 0..n {
        let mut row = vec![r.to_string()];
        row.extend(
            cols.iter()
                .map(|(_, v)| v.get(r).cloned().unwrap_or_default()),
        );
        table.push(row);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    table
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:>w$}", w = widths[c]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An HTML table (`text/html` of a Datatable in a notebook).
pub fn html_table(v: &Value) -> String {
    let cols = columns(v);
    let n = rows(&cols);
    let mut s = String::from("<table class=\"dataframe\">\n  <thead>\n    <tr>\n      <th></th>\n");
    for (name, _) in &cols {
        s.push_str(&format!("      <th>{}</th>\n", html_escape(name)));
    }
    s.push_str("    </tr>\n  </thead>\n  <tbody>\n");
    for r in 0..n {
        s.push_str(&format!("    <tr>\n      <th>{r}</th>\n"));
        for (_, values) in &cols {
            let cell = values.get(r).map(String::as_str).unwrap_or("");
            s.push_str(&format!("      <td>{}</td>\n", html_escape(cell)));
        }
        s.push_str("    </tr>\n");
    }
    s.push_str("  </tbody>\n</table>");
    s
}

/// A Markdown pipe table.
pub fn markdown_table(v: &Value) -> String {
    let cols = columns(v);
    let n = rows(&cols);
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut s = String::from("|   |");
    for (name, _) in &cols {
        s.push_str(&format!(" {} |", esc(name)));
    }
    s.push_str("\n|---|");
    for _ in &cols {
        s.push_str("---|");
    }
    s.push('\n');
    for r in 0..n {
        s.push_str(&format!("| {r} |"));
        for (_, values) in &cols {
            s.push_str(&format!(
                " {} |",
                esc(values.get(r).map(String::as_str).unwrap_or(""))
            ));
        }
        s.push('\n');
    }
    s
}

/// The media type and bytes of an ImageObject with a `data:` URL.
pub fn image_data(v: &Value) -> Option<(String, Vec<u8>)> {
    let url = v.get("contentUrl")?.as_str()?;
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()?;
    Some((mime.to_string(), bytes))
}

/// The file extension for an image media type.
pub fn image_extension(mime: &str) -> &'static str {
    match mime {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/svg+xml" => "svg",
        "image/gif" => "gif",
        _ => "bin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_and_literals() {
        let t = json!({"type":"Datatable","columns":[
            {"type":"DatatableColumn","name":"a","values":[1,2]},
            {"type":"DatatableColumn","name":"b","values":["x|y",null]}]});
        assert_eq!(text_table(&t), "   a    b\n0  1  x|y\n1  2  NaN");
        assert!(html_table(&t).contains("<th>a</th>") && html_table(&t).contains("<td>x|y</td>"));
        assert!(markdown_table(&t).contains("| 0 | 1 | x\\|y |"));
        assert_eq!(
            text_plain(&json!({"a": [true, null, "s"]}), "python"),
            "{'a': [True, None, 's']}"
        );
        assert_eq!(text_plain(&json!([1, null]), "javascript"), "[1,null]");
        assert_eq!(text_plain(&json!("as is"), "python"), "as is");
        let img = json!({"type":"ImageObject","contentUrl":"data:image/png;base64,aGk="});
        assert_eq!(image_data(&img), Some(("image/png".into(), b"hi".to_vec())));
    }
}
