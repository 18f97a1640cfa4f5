//! Markdown with executable code blocks (`.md`, `.qmd`, `.Rmd`).
//!
//! Executed: fenced blocks whose info string is `{lang …}` (Quarto/R Markdown chunks, always
//! executed, so an unknown language gives that chunk an error), and plain fences whose first
//! word is a language the agent runs (`python`, `py`, `bash`, `sh`, `javascript`, `js`,
//! `node`, `r`…). Other fences (`json`, `text`, `console`…) are prose.
//!
//! Outputs go right after their block, between marker comments:
//!
//! ````markdown
//! ```python
//! print("hi")
//! ```
//!
//! <!-- sparkla:output -->
//! ```text
//! hi
//! ```
//!
//! <!-- sparkla:end -->
//! ````
//!
//! A later execution replaces that region instead of adding another. Everything outside
//! the regions is copied byte for byte. Figures are written beside the output file as
//! `<stem>_files/chunk-<n>-<k>-<digest>.png` and linked (as `data:` URLs when the document
//! goes to stdout). Provenance goes in one `<!-- sparkla:provenance … -->` comment at the end.

use serde_json::Value;
use sparkla_protocol::agent::Stream;
use sparkla_protocol::nodes::node_type;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::canonical::sha256_hex;
use crate::document::{Chunk, ChunkResult, Document, Item, SideFile};
use crate::render;

pub const OUTPUT_START: &str = "<!-- sparkla:output -->";
pub const OUTPUT_END: &str = "<!-- sparkla:end -->";
pub const PROVENANCE_START: &str = "<!-- sparkla:provenance";

/// Languages that plain fences (without braces) are executed in.
const EXECUTABLE: [&str; 11] = [
    "python",
    "python3",
    "py",
    "bash",
    "sh",
    "shell",
    "javascript",
    "js",
    "node",
    "nodejs",
    "r",
];

/// Where figures go.
#[derive(Debug, Clone, PartialEq)]
pub enum Images {
    /// Written to `dir` (absolute) and linked as `link_prefix/<name>`.
    Files { dir: PathBuf, link_prefix: String },
    /// Inlined as `data:` URLs.
    Inline,
}

impl Images {
    /// Figures of a document written to `output`: `<stem>_files/` beside it.
    pub fn beside(output: &Path) -> Self {
        let stem = output
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "document".into());
        let prefix = format!("{stem}_files");
        let dir = output
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join(&prefix);
        Images::Files {
            dir,
            link_prefix: prefix,
        }
    }
}

struct Block {
    /// Byte range of the output region after the block (empty when it has none).
    region: Range<usize>,
    /// The block's closing fence has no newline (it ends the file).
    needs_newline: bool,
    /// New outputs: `Some(body)` once executed (empty body: no outputs, no region).
    fresh: Option<String>,
    /// The stored body (between the markers) when read.
    stored: Option<String>,
}

pub struct Markdown {
    src: String,
    chunks: Vec<Chunk>,
    blocks: Vec<Block>,
    provenance_region: Option<Range<usize>>,
    provenance: Option<String>,
    images: Images,
    /// The directory links are relative to (the output's directory).
    base: PathBuf,
    side: Vec<SideFile>,
}

fn fence_open(line: &str) -> Option<(char, usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let c = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = rest.chars().take_while(|x| *x == c).count();
    if n < 3 {
        return None;
    }
    let info = rest[n..].trim();
    if c == '`' && info.contains('`') {
        return None;
    }
    Some((c, n, info))
}

fn fence_close(line: &str, c: char, n: usize) -> bool {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return false;
    }
    let rest = line[indent..].trim_end();
    rest.len() >= n && rest.chars().all(|x| x == c)
}

/// The language of a fence's info string, if the block is to be executed.
fn executable_language(info: &str) -> Option<String> {
    if let Some(inner) = info.strip_prefix('{') {
        let inner = inner.trim_end_matches('}').trim().trim_start_matches('.');
        let lang = inner
            .split(|c: char| c == ',' || c.is_whitespace())
            .next()
            .unwrap_or("");
        return (!lang.is_empty()).then(|| lang.to_string());
    }
    let lang = info.split_whitespace().next()?;
    EXECUTABLE
        .contains(&lang.to_ascii_lowercase().as_str())
        .then(|| lang.to_string())
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

impl Markdown {
    /// Read Markdown (any UTF-8 text parses). `base`: the directory image links are relative to.
    pub fn parse(src: String, images: Images, base: PathBuf) -> Self {
        let lines: Vec<(usize, &str)> = {
            let mut pos = 0;
            src.split_inclusive('\n')
                .map(|l| {
                    let start = pos;
                    pos += l.len();
                    (start, l)
                })
                .collect()
        };
        let mut chunks = Vec::new();
        let mut blocks: Vec<Block> = Vec::new();
        let mut provenance_region = None;
        let mut i = 0;
        while i < lines.len() {
            let (start, line) = lines[i];
            if line.trim_start().starts_with(PROVENANCE_START) {
                // Through the closing `-->`; with the blank line before it.
                let mut j = i;
                while j < lines.len() && !lines[j].1.trim_end().ends_with("-->") {
                    j += 1;
                }
                let end = lines.get(j).map(|(s, l)| s + l.len()).unwrap_or(src.len());
                let begin = if i > 0 && is_blank(lines[i - 1].1) {
                    lines[i - 1].0
                } else {
                    start
                };
                provenance_region = Some(begin..end);
                i = j + 1;
                continue;
            }
            let Some((c, n, info)) = fence_open(line) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < lines.len() && !fence_close(lines[j].1, c, n) {
                j += 1;
            }
            let language = executable_language(info);
            if j >= lines.len() || language.is_none() {
                // An unclosed fence runs to the end of the document; a non-executable one is prose.
                i = j + 1;
                continue;
            }
            let code: String = lines[i + 1..j].iter().map(|(_, l)| *l).collect();
            let (close_start, close) = lines[j];
            let after = close_start + close.len();
            // An output region: blank lines, then the start marker … end marker.
            let mut k = j + 1;
            while k < lines.len() && is_blank(lines[k].1) {
                k += 1;
            }
            let mut region = after..after;
            let mut stored = None;
            if k < lines.len() && lines[k].1.trim() == OUTPUT_START {
                let mut m = k + 1;
                while m < lines.len() && lines[m].1.trim() != OUTPUT_END {
                    m += 1;
                }
                if m < lines.len() {
                    let body_start = lines[k].0 + lines[k].1.len();
                    let body_end = lines[m].0;
                    stored = Some(src[body_start..body_end].to_string());
                    region = after..lines[m].0 + lines[m].1.len();
                    j = m;
                }
            }
            chunks.push(Chunk {
                label: format!("chunk {} (line {})", chunks.len() + 1, i + 1),
                language,
                code,
                expression: false,
            });
            blocks.push(Block {
                region,
                needs_newline: !close.ends_with('\n'),
                fresh: None,
                stored,
            });
            i = j + 1;
        }
        Markdown {
            src,
            chunks,
            blocks,
            provenance_region,
            provenance: None,
            images,
            base,
            side: Vec::new(),
        }
    }

    /// Replace image targets by the digest of the image they point to.
    fn normalise(&self, body: &str) -> String {
        let mut out = String::new();
        for line in body.split_inclusive('\n') {
            let trimmed = line.trim_end();
            if let (true, Some(open), true) = (
                trimmed.starts_with("!["),
                trimmed.find("]("),
                trimmed.ends_with(')'),
            ) {
                let target = &trimmed[open + 2..trimmed.len() - 1];
                let bytes = if target.starts_with("data:") {
                    render::image_data(&serde_json::json!({ "contentUrl": target })).map(|x| x.1)
                } else {
                    let path = self.base.join(target);
                    self.side
                        .iter()
                        .find(|f| f.path == path)
                        .map(|f| f.bytes.clone())
                        .or_else(|| std::fs::read(&path).ok())
                };
                let shown = match bytes {
                    Some(b) => format!("sha256:{}", sha256_hex(&b)),
                    None => format!("missing image {target}"),
                };
                out.push_str(&format!("{}]({shown})\n", &trimmed[..open]));
            } else {
                out.push_str(line);
            }
        }
        out
    }

    fn image_link(&mut self, chunk: usize, k: usize, v: &Value) -> String {
        let Some((mime, bytes)) = render::image_data(v) else {
            let url = v.get("contentUrl").and_then(Value::as_str).unwrap_or("");
            return format!("![Figure {}.{k}]({url})\n", chunk + 1);
        };
        match &self.images {
            Images::Inline => {
                let url = v.get("contentUrl").and_then(Value::as_str).unwrap_or("");
                format!("![Figure {}.{k}]({url})\n", chunk + 1)
            }
            Images::Files { dir, link_prefix } => {
                let name = format!(
                    "chunk-{}-{k}-{}.{}",
                    chunk + 1,
                    &sha256_hex(&bytes)[..12],
                    render::image_extension(&mime)
                );
                let link = format!("{link_prefix}/{name}");
                let path = dir.join(&name);
                self.side.retain(|f| f.path != path);
                self.side.push(SideFile { path, bytes });
                format!("![Figure {}.{k}]({link})\n", chunk + 1)
            }
        }
    }
}

/// A fenced block whose fence is longer than any backtick run in the text.
fn fenced(info: &str, text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat((longest + 1).max(3));
    let nl = if text.ends_with('\n') { "" } else { "\n" };
    format!("{fence}{info}\n{text}{nl}{fence}\n")
}

impl Document for Markdown {
    fn format(&self) -> &'static str {
        "md"
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn apply(&mut self, i: usize, result: &ChunkResult) {
        let language = self.chunks[i].language.clone().unwrap_or_default();
        let mut body = String::new();
        let mut images = 0;
        for item in &result.items {
            let part = match item {
                Item::Stream { stream, text } => fenced(
                    match stream {
                        Stream::Stdout => "text",
                        Stream::Stderr => "stderr",
                    },
                    text,
                ),
                Item::Value(v) => match (node_type(v), v) {
                    (Some("ImageObject"), _) => {
                        images += 1;
                        self.image_link(i, images, v)
                    }
                    (Some("Datatable"), _) => render::markdown_table(v),
                    (_, Value::String(s)) => fenced("text", s),
                    _ if render::is_python(&language) => {
                        fenced("text", &render::text_plain(v, &language))
                    }
                    _ => fenced("json", &serde_json::to_string_pretty(v).unwrap_or_default()),
                },
            };
            body.push_str(&part);
            body.push('\n');
        }
        for e in &result.errors {
            let text = match &e.stack_trace {
                Some(t) if !t.is_empty() => t.clone(),
                _ => format!(
                    "{}: {}",
                    e.error_type.as_deref().unwrap_or("Error"),
                    e.error_message
                ),
            };
            body.push_str(&fenced("error", &text));
            body.push('\n');
        }
        self.blocks[i].fresh = Some(body);
    }

    fn stored(&self, i: usize) -> Value {
        let b = &self.blocks[i];
        match b.fresh.as_ref().or(b.stored.as_ref()) {
            Some(body) if !body.is_empty() => Value::String(self.normalise(body)),
            _ => Value::Null,
        }
    }

    fn set_provenance(&mut self, provenance: Value) {
        let json = serde_json::to_string_pretty(&provenance)
            .unwrap_or_default()
            .replace("-->", "--\\u003e");
        self.provenance = Some(format!("\n{PROVENANCE_START}\n{json}\n-->\n"));
    }

    fn render(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.src.len() + 1024);
        let mut pos = 0;
        let prov = self.provenance_region.clone();
        let copy = |out: &mut String, from: usize, to: usize| {
            // Copy src[from..to], leaving out an old provenance comment when replaced.
            match &prov {
                Some(r) if self.provenance.is_some() && r.start >= from && r.end <= to => {
                    out.push_str(&self.src[from..r.start]);
                    out.push_str(&self.src[r.end..to]);
                }
                _ => out.push_str(&self.src[from..to]),
            }
        };
        for b in &self.blocks {
            copy(&mut out, pos, b.region.start);
            match &b.fresh {
                Some(body) if body.is_empty() => {}
                Some(body) => {
                    if b.needs_newline {
                        out.push('\n');
                    }
                    out.push('\n');
                    out.push_str(OUTPUT_START);
                    out.push('\n');
                    out.push_str(body);
                    out.push_str(OUTPUT_END);
                    out.push('\n');
                }
                None => out.push_str(&self.src[b.region.clone()]),
            }
            pos = b.region.end;
        }
        copy(&mut out, pos, self.src.len());
        if let Some(p) = &self.provenance {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(p);
        }
        out.into_bytes()
    }

    fn side_files(&self) -> Vec<SideFile> {
        self.side.clone()
    }

    fn obsolete_files(&self) -> Vec<PathBuf> {
        let Images::Files { dir, link_prefix } = &self.images else {
            return Vec::new();
        };
        let linked = |body: &str| -> Vec<PathBuf> {
            body.lines()
                .filter_map(|l| {
                    let l = l.trim_end();
                    let target = l
                        .strip_prefix("![")?
                        .split_once("](")?
                        .1
                        .strip_suffix(')')?;
                    let name = target
                        .strip_prefix(link_prefix.as_str())?
                        .strip_prefix('/')?;
                    is_figure_name(name).then(|| dir.join(name))
                })
                .collect()
        };
        let new: Vec<PathBuf> = self
            .blocks
            .iter()
            .flat_map(|b| {
                linked(
                    b.fresh
                        .as_ref()
                        .or(b.stored.as_ref())
                        .map_or("", String::as_str),
                )
            })
            .collect();
        self.blocks
            .iter()
            .filter(|b| b.fresh.is_some())
            .flat_map(|b| linked(b.stored.as_deref().unwrap_or("")))
            .filter(|p| !new.contains(p))
            .collect()
    }
}

/// Whether a file name is one this module gives figures: `chunk-<n>-<k>-<12 hex>.<ext>`.
fn is_figure_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("chunk-") else {
        return false;
    };
    let Some((stem, ext)) = rest.rsplit_once('.') else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    parts.len() == 3
        && parts[0].chars().all(|c| c.is_ascii_digit())
        && parts[1].chars().all(|c| c.is_ascii_digit())
        && parts[2].len() == 12
        && parts[2].chars().all(|c| c.is_ascii_hexdigit())
        && !ext.is_empty()
        && !name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sparkla_protocol::CodeError;

    const DOC: &str = "# Report\n\nSome *prose*.\n\n```python\nprint('hi')\n```\n\n```json\n{\"not\": \"run\"}\n```\n\n```{bash echo=FALSE}\necho $((6*7))\n```\nTrailing text without newline";

    fn out(text: &str) -> ChunkResult {
        ChunkResult {
            items: vec![Item::Stream {
                stream: Stream::Stdout,
                text: text.into(),
            }],
            errors: vec![],
            duration: 0.0,
            node: json!({}),
        }
    }

    #[test]
    fn finds_chunks_and_replaces_outputs_on_re_execution() {
        let mut md = Markdown::parse(DOC.into(), Images::Inline, PathBuf::from("."));
        assert_eq!(md.chunks().len(), 2);
        assert_eq!(md.chunks()[0].language.as_deref(), Some("python"));
        assert_eq!(md.chunks()[0].code, "print('hi')\n");
        assert_eq!(md.chunks()[1].language.as_deref(), Some("bash"));
        assert_eq!(md.chunks()[1].label, "chunk 2 (line 13)");
        // Nothing executed: byte for byte.
        assert_eq!(md.render(), DOC.as_bytes());
        md.apply(0, &out("hi\n"));
        md.apply(1, &out("42\n"));
        md.set_provenance(json!({"sparkla": "x"}));
        let once = String::from_utf8(md.render()).unwrap();
        assert!(once.contains("```\n\n<!-- sparkla:output -->\n```text\nhi\n```\n\n<!-- sparkla:end -->\n\n```json"), "{once}");
        assert!(once.starts_with("# Report\n\nSome *prose*.\n\n```python\nprint('hi')\n```\n"));
        assert_eq!(once.matches(PROVENANCE_START).count(), 1);

        // Re-execution replaces: same outputs give the same bytes.
        let mut again = Markdown::parse(once.clone(), Images::Inline, PathBuf::from("."));
        assert_eq!(again.chunks().len(), 2);
        assert_eq!(again.stored(0), json!("```text\nhi\n```\n\n"));
        again.apply(0, &out("hi\n"));
        again.apply(1, &out("42\n"));
        again.set_provenance(json!({"sparkla": "x"}));
        assert_eq!(String::from_utf8(again.render()).unwrap(), once);

        // Different outputs replace the old ones.
        let mut third = Markdown::parse(once.clone(), Images::Inline, PathBuf::from("."));
        third.apply(0, &out("bye\n"));
        let text = String::from_utf8(third.render()).unwrap();
        assert_eq!(text.matches(OUTPUT_START).count(), 2);
        assert!(text.contains("bye") && !text.contains("```text\nhi"));
    }

    #[test]
    fn replaced_figures_are_obsolete_and_kept_ones_are_not() {
        let images = Images::Files {
            dir: PathBuf::from("/d/doc_files"),
            link_prefix: "doc_files".into(),
        };
        let old = "```python\nplot()\n```\n\n<!-- sparkla:output -->\n![Figure 1.1](doc_files/chunk-1-1-aaaaaaaaaaaa.png)\n\n![x](doc_files/mine.png)\n\n<!-- sparkla:end -->\n\n```python\nplot()\n```\n\n<!-- sparkla:output -->\n![Figure 2.1](doc_files/chunk-2-1-bbbbbbbbbbbb.png)\n\n<!-- sparkla:end -->\n";
        let mut md = Markdown::parse(old.into(), images, PathBuf::from("/d"));
        assert!(
            md.obsolete_files().is_empty(),
            "nothing executed, nothing obsolete"
        );
        let r = ChunkResult {
            items: vec![Item::Value(
                json!({"type":"ImageObject","contentUrl":"data:image/png;base64,aGk="}),
            )],
            errors: vec![],
            duration: 0.0,
            node: json!({}),
        };
        md.apply(0, &r);
        assert_eq!(
            md.obsolete_files(),
            vec![PathBuf::from("/d/doc_files/chunk-1-1-aaaaaaaaaaaa.png")],
            "the replaced figure only: not the user's file, not chunk 2's"
        );
        assert!(is_figure_name("chunk-1-1-aaaaaaaaaaaa.png"));
        assert!(!is_figure_name("chunk-1-1-../x.png") && !is_figure_name("mine.png"));
    }

    #[test]
    fn errors_tables_images_and_fences() {
        let mut md = Markdown::parse("```py\nx\n```\n".into(), Images::Inline, PathBuf::from("."));
        let r = ChunkResult {
            items: vec![
                Item::Stream {
                    stream: Stream::Stdout,
                    text: "```inner```\n".into(),
                },
                Item::Value(
                    json!({"type":"Datatable","columns":[{"type":"DatatableColumn","name":"a","values":[1]}]}),
                ),
                Item::Value(
                    json!({"type":"ImageObject","contentUrl":"data:image/png;base64,aGk="}),
                ),
            ],
            errors: vec![CodeError::new("NameError", "name 'x' is not defined")],
            duration: 0.0,
            node: json!({}),
        };
        md.apply(0, &r);
        let text = String::from_utf8(md.render()).unwrap();
        assert!(text.contains("````text\n```inner```\n````\n"), "{text}");
        assert!(text.contains("| 0 | 1 |"));
        assert!(text.contains("![Figure 1.1](data:image/png;base64,aGk=)"));
        assert!(text.contains("```error\nNameError: name 'x' is not defined\n```"));
        // The comparable form has the image's digest, not its URL.
        let stored = md.stored(0);
        assert!(stored
            .as_str()
            .unwrap()
            .contains(&format!("sha256:{}", sha256_hex(b"hi"))));
    }
}
