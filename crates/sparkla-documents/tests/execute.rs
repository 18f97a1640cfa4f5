//! Real documents through the real sandbox runtime, the real agent and real interpreters.

mod common;

use common::*;
use serde_json::{json, Value};
use sparkla_documents::{execute, markdown, Error, Output};
use std::path::{Path, PathBuf};

fn code(id: &str, source: &str) -> Value {
    json!({"cell_type": "code", "id": id, "metadata": {}, "source": source, "outputs": [], "execution_count": null})
}

fn notebook(cells: Vec<Value>) -> Value {
    json!({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "custom": {"kept": true}
        },
        "cells": cells,
    })
}

fn write_json(path: &Path, v: &Value) -> Vec<u8> {
    let bytes = serde_json::to_vec_pretty(v).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn notebook_state_stream_figure_table_and_error() {
    if skip("notebook_state_stream_figure_table_and_error") {
        return;
    }
    let dir = tmpdir();
    let input = dir.path().join("analysis.ipynb");
    let output = dir.path().join("out.ipynb");
    let original = write_json(
        &input,
        &notebook(vec![
            json!({"cell_type": "markdown", "id": "intro", "metadata": {"tags": ["keep"]}, "source": ["# Analysis\n", "Some text"]}),
            code("state", "x = 21\nprint('x is', x)\nimport sys\nprint('careful', file=sys.stderr)"),
            code("value", "x * 2"),
            code("env", "import os, time, socket, getpass\n[os.environ['TZ'], os.environ['LC_ALL'], os.environ['PYTHONHASHSEED'], time.tzname[0], socket.gethostname(), getpass.getuser()]"),
            code("figure", "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(2, 2))\nax.plot([1, 2, 3], [1, 4, 9])"),
            code("table", "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"),
            code("shell", "%%bash\necho from bash $((6*7))"),
            json!({"cell_type": "raw", "id": "raw1", "metadata": {}, "source": "raw text"}),
            code("boom", "print('before')\n1/0"),
            code("after", "print('never')"),
        ]),
    );
    let mut opts = options(&input, "nb", 0);
    opts.output = Output::File(output.clone());
    let report = execute(opts).await.expect("execute");
    assert_eq!(report.runtime, "sandbox");
    assert_eq!(report.errors(), 1, "{report:?}");
    assert_eq!(report.executed(), 7, "stopped at the error cell");
    assert!(!report.success(false));
    assert_eq!(std::fs::read(&input).unwrap(), original, "input untouched");
    assert_no_leftovers("nb", 0).await;

    let nb = read_json(&output);
    let cells = nb["cells"].as_array().unwrap();
    // Markdown and raw cells, ids and metadata preserved.
    assert_eq!(cells[0]["id"], "intro");
    assert_eq!(cells[0]["metadata"]["tags"][0], "keep");
    assert_eq!(cells[0]["source"], json!(["# Analysis\n", "Some text"]));
    assert_eq!(cells[7]["source"], "raw text");
    assert_eq!(nb["metadata"]["custom"]["kept"], true);
    // stdout and stderr apart.
    let outs = cells[1]["outputs"].as_array().unwrap();
    assert_eq!(outs[0]["output_type"], "stream");
    assert_eq!(outs[0]["name"], "stdout");
    assert_eq!(text(&outs[0]["text"]), "x is 21\n");
    assert_eq!(outs[1]["name"], "stderr");
    assert_eq!(text(&outs[1]["text"]), "careful\n");
    assert_eq!(cells[1]["execution_count"], 1);
    // State across cells; execute_result with text/plain and application/json.
    let r = &cells[2]["outputs"][0];
    assert_eq!(r["output_type"], "execute_result");
    assert_eq!(text(&r["data"]["text/plain"]), "42");
    assert_eq!(r["data"]["application/json"], 42);
    assert_eq!(r["execution_count"], 2);
    // The fixed session environment.
    assert_eq!(
        cells[3]["outputs"][0]["data"]["application/json"],
        json!(["UTC", "C.UTF-8", "0", "UTC", "sparkla", "user"]),
        "{}",
        cells[3]
    );
    // A figure as display_data image/png.
    let fig = &cells[4]["outputs"][0];
    assert_eq!(fig["output_type"], "display_data", "{}", cells[4]);
    let png = fig["data"]["image/png"].as_str().unwrap();
    assert!(png.starts_with("iVBORw0KGgo"), "a PNG in base64");
    // A table with text/html and text/plain.
    let table = &cells[5]["outputs"][0];
    assert_eq!(table["output_type"], "execute_result");
    assert!(text(&table["data"]["text/html"]).contains("<th>a</th>"));
    assert!(
        text(&table["data"]["text/plain"]).contains("0  1  x"),
        "{table}"
    );
    // Cell magic.
    assert_eq!(text(&cells[6]["outputs"][0]["text"]), "from bash 42\n");
    // The error, after the output before it.
    let outs = cells[8]["outputs"].as_array().unwrap();
    assert_eq!(text(&outs[0]["text"]), "before\n");
    assert_eq!(outs[1]["output_type"], "error");
    assert_eq!(outs[1]["ename"], "ZeroDivisionError");
    assert_eq!(outs[1]["evalue"], "division by zero");
    assert!(outs[1]["traceback"].as_array().unwrap().len() > 1);
    // The cell after the error did not run.
    assert_eq!(cells[9]["outputs"], json!([]));
    assert_eq!(cells[9]["execution_count"], Value::Null);
    // Provenance.
    let p = &nb["metadata"]["sparkla"];
    assert_eq!(p["runtime"], "sandbox");
    assert_eq!(p["sparkla"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["complete"], false);
    assert!(p["environment"]["interpreters"]["python"]["version"]
        .as_str()
        .unwrap()
        .starts_with("Python 3"));
    assert_eq!(p["environment"]["variables"]["TZ"], "UTC");
    assert_eq!(p["chunks"].as_array().unwrap().len(), 8);
    assert!(p["chunks"][0]["outputDigest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(p["chunks"][0]["duration"].as_f64().is_some());
    assert_eq!(p["chunks"][7]["executed"], false);
    assert!(p["executedAt"].as_str().unwrap().ends_with('Z'));
    validate_notebook(&output);
}

#[tokio::test(flavor = "multi_thread")]
async fn continue_on_error_runs_every_chunk_and_unsupported_languages_do_not_stop() {
    if skip("continue_on_error_runs_every_chunk") {
        return;
    }
    let dir = tmpdir();
    let input = dir.path().join("e.ipynb");
    write_json(
        &input,
        &notebook(vec![code("a", "1/0"), code("b", "print('still runs')")]),
    );
    let mut opts = options(&input, "coe", 1);
    opts.continue_on_error = true;
    let report = execute(opts).await.expect("execute");
    assert_eq!(report.executed(), 2);
    assert_eq!(report.errors(), 1);
    let nb: Value = serde_json::from_slice(report.document.as_ref().unwrap()).unwrap();
    assert_eq!(text(&nb["cells"][1]["outputs"][0]["text"]), "still runs\n");

    // Stencila article: an unknown language is that chunk's error; the others still run.
    let article = dir.path().join("article.json");
    let original = write_json(
        &article,
        &json!({"type": "Article", "title": "T", "content": [
            {"type": "Paragraph", "content": ["The answer is ", {"type": "CodeExpression", "programmingLanguage": "python", "text": "6 * 7"}, "."]},
            {"type": "CodeChunk", "id": "setup", "programmingLanguage": "python", "text": "y = 10\nprint('set')", "label": "Setup"},
            {"type": "CodeChunk", "id": "cobol", "programmingLanguage": "cobol", "text": "DISPLAY 'HI'."},
            {"type": "Figure", "content": [
                {"type": "CodeChunk", "id": "nested", "programmingLanguage": "bash", "text": "echo nested"},
                {"type": "CodeExpression", "programmingLanguage": "python", "text": "y + 1"}
            ]}
        ]}),
    );
    let opts = options(&article, "coe", 1);
    let report = execute(opts).await.expect("execute");
    assert_eq!(report.executed(), 5, "{report:?}");
    assert_eq!(report.errors(), 1);
    assert!(!report.success(false));
    assert_eq!(std::fs::read(&article).unwrap(), original);
    let doc: Value = serde_json::from_slice(report.document.as_ref().unwrap()).unwrap();
    assert_eq!(doc["content"][0]["content"][1]["output"], 42);
    assert_eq!(doc["content"][1]["outputs"], json!(["set\n"]));
    assert_eq!(
        doc["content"][1]["label"], "Setup",
        "unknown properties kept"
    );
    assert!(doc["content"][1]["duration"].as_f64().is_some());
    assert_eq!(
        doc["content"][2]["errors"][0]["errorType"],
        "UnknownLanguage"
    );
    assert_eq!(
        doc["content"][3]["content"][0]["outputs"],
        json!(["nested\n"])
    );
    assert_eq!(doc["content"][3]["content"][1]["output"], 11);
    assert_eq!(doc["meta"]["sparkla"]["runtime"], "sandbox");
    assert_no_leftovers("coe", 1).await;
}

const REPORT: &str = "---\ntitle: A report\n---\n\n# Results   \n\nProse with  two spaces and a tab\there.\n\n```python\nimport random\nrandom.seed(1)\nvalues = [random.randint(0, 100) for _ in range(5)]\nprint(values)\n```\n\nA shell step:\n\n```{bash}\necho \"sum from bash\"\n```\n\n```json\n{\"shown\": \"not executed\"}\n```\n\n```{python fig.cap=\"A plot\"}\nimport matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(2, 2))\nax.bar(range(5), values)\n```\n\n```python\nsum(values)\n```\nThe end, without a final newline";

/// The text outside the output regions and the provenance comment.
fn prose(s: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in s.split_inclusive('\n') {
        let t = line.trim();
        if t == markdown::OUTPUT_START || t.starts_with(markdown::PROVENANCE_START) {
            skipping = true;
            // The blank line inserted before the region.
            if out.ends_with("\n\n") {
                out.pop();
            }
            continue;
        }
        if skipping {
            if t == markdown::OUTPUT_END || t == "-->" {
                skipping = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn markdown_report_mixing_python_and_bash_round_trips() {
    if skip("markdown_report_round_trips") {
        return;
    }
    let dir = tmpdir();
    let input = dir.path().join("report.qmd");
    std::fs::write(&input, REPORT).unwrap();
    let output = dir.path().join("executed.md");
    let mut opts = options(&input, "md", 2);
    opts.output = Output::File(output.clone());
    let report = execute(opts).await.expect("execute");
    assert_eq!(report.chunks.len(), 4, "{report:?}");
    assert_eq!(report.errors(), 0, "{report:?}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), REPORT);
    let once = std::fs::read_to_string(&output).unwrap();
    assert_eq!(once.matches(markdown::OUTPUT_START).count(), 4, "{once}");
    assert!(once.contains("```text\n[17, 72, 97, 8, 32]\n```"), "{once}");
    assert!(once.contains("```text\nsum from bash\n```"), "{once}");
    assert!(once.contains("```text\n226\n```"), "{once}");
    // The figure is a file beside the output, linked.
    let link = once
        .lines()
        .find(|l| l.starts_with("![Figure 3.1](executed_files/chunk-3-1-"))
        .unwrap_or_else(|| panic!("no figure link in {once}"));
    let target = &link[link.find("](").unwrap() + 2..link.len() - 1];
    let png = std::fs::read(dir.path().join(target)).expect("figure written");
    assert!(png.starts_with(b"\x89PNG"));
    // Prose byte for byte (the last line gains the newline the output region needs).
    assert_eq!(prose(&once), REPORT.replace("newline", "newline\n"));
    assert!(once.starts_with("---\ntitle: A report\n---\n\n# Results   \n\nProse with  two spaces and a tab\there.\n\n```python\n"));

    // Re-executing the executed document in place replaces outputs: same regions, same text.
    let mut opts = options(&output, "md", 2);
    opts.output = Output::InPlace;
    let report = execute(opts).await.expect("re-execute");
    assert_eq!(report.errors(), 0);
    let twice = std::fs::read_to_string(&output).unwrap();
    assert_eq!(twice.matches(markdown::OUTPUT_START).count(), 4);
    assert_eq!(twice.matches(markdown::PROVENANCE_START).count(), 1);
    let without_provenance = |s: &str| s[..s.find(markdown::PROVENANCE_START).unwrap()].to_string();
    assert_eq!(without_provenance(&twice), without_provenance(&once));

    let figures = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path().join("executed_files"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(figures().len(), 1, "the same figure, not a second one");

    // A changed figure replaces the old file (the user's own files there stay).
    std::fs::write(dir.path().join("executed_files/mine.png"), b"user file").unwrap();
    let before = figures();
    let changed = twice.replace("ax.bar(range(5), values)", "ax.bar(range(5), values[::-1])");
    let changed_doc = dir.path().join("executed.md");
    std::fs::write(&changed_doc, &changed).unwrap();
    let mut opts = options(&changed_doc, "md", 2);
    opts.output = Output::InPlace;
    execute(opts).await.expect("re-execute a changed figure");
    let after = figures();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.contains(&"mine.png".to_string()));
    assert!(
        after.iter().all(|f| !before.contains(f) || f == "mine.png"),
        "{before:?} -> {after:?}"
    );
    let current = std::fs::read_to_string(&changed_doc).unwrap();
    std::fs::write(&changed_doc, current.replace("values[::-1]", "values")).unwrap();
    let mut opts = options(&changed_doc, "md", 2);
    opts.output = Output::InPlace;
    execute(opts).await.expect("back to the original figure");
    assert_eq!(figures(), before);
    let twice = std::fs::read_to_string(&output).unwrap();

    // And it reproduces.
    let mut opts = options(&output, "md", 2);
    opts.check = true;
    let report = execute(opts).await.expect("check");
    assert!(report.success(true), "{:?}", report.differing());
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        twice,
        "--check never writes"
    );
    assert_no_leftovers("md", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_when_reproducible_and_names_the_tampered_chunk() {
    if skip("check_passes_and_names_the_tampered_chunk") {
        return;
    }
    let dir = tmpdir();
    let input = dir.path().join("det.ipynb");
    write_json(
        &input,
        &notebook(vec![
            code(
                "seed",
                "import random\nrandom.seed(42)\nprint(random.random())",
            ),
            code("hash", "hash('sparkla')"),
            code(
                "sets",
                "print(sorted({'b', 'a', 'c'}))\n{'k': [1, 2.5, None]}",
            ),
            code(
                "fig",
                "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.title('t')",
            ),
            code("err", "raise ValueError('expected')"),
        ]),
    );
    let mut opts = options(&input, "check", 3);
    opts.continue_on_error = true;
    opts.output = Output::InPlace;
    let first = execute(opts).await.expect("execute");
    assert_eq!(first.errors(), 1);
    validate_notebook(&input);
    let executed = std::fs::read(&input).unwrap();

    let mut opts = options(&input, "check", 3);
    opts.check = true;
    let report = execute(opts).await.expect("check");
    assert!(
        report.success(true),
        "a deterministic notebook reproduces: {:#?}",
        report.differing()
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        executed,
        "--check never writes"
    );
    assert!(report.document.is_none());

    // Tamper with the output of the third code cell (id "sets").
    let mut nb = read_json(&input);
    nb["cells"][2]["outputs"][0]["text"] = json!(["['a', 'b', 'X']\n"]);
    // Timing fields and execution counts are not compared.
    nb["metadata"]["sparkla"]["chunks"][0]["duration"] = json!(123.0);
    nb["cells"][0]["execution_count"] = json!(99);
    let tampered = write_json(&input, &nb);
    let mut opts = options(&input, "check", 3);
    opts.check = true;
    let report = execute(opts).await.expect("check");
    let differing = report.differing();
    assert_eq!(differing.len(), 1, "{differing:#?}");
    assert_eq!(differing[0].label, "cell 3 (id \"sets\")");
    let diff = differing[0].diff.as_deref().unwrap();
    assert!(
        diff.contains("-    ['a', 'b', 'X']") && diff.contains("+    ['a', 'b', 'c']"),
        "{diff}"
    );
    assert!(!report.success(true));
    let summary = sparkla_documents::cli::summary(&report, true);
    assert!(
        summary.contains("cell 3 (id \"sets\") differs"),
        "{summary}"
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        tampered,
        "--check never writes"
    );
    assert_no_leftovers("check", 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_unwritable_output_fail_before_any_session() {
    // No root needed: these fail before a session starts. The runtime named here does not
    // exist, so reaching the session would give a different error.
    let dir = tmpdir();
    let opts = |input: PathBuf| {
        let mut o = sparkla_documents::ExecuteOptions::new(
            input,
            sparkla_documents::Session::Runtime {
                name: "no-such-runtime".into(),
                agent: None,
                environment: None,
            },
        );
        o.progress = sparkla_documents::Progress::Never;
        o
    };
    let bad = dir.path().join("bad.ipynb");
    std::fs::write(
        &bad,
        "{\n  \"nbformat\": 4,\n  \"cells\": [\n    {\"cell_type\": \"code\",}\n  ]\n}\n",
    )
    .unwrap();
    match execute(opts(bad.clone())).await {
        Err(e @ Error::Parse { line: 4, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("bad.ipynb") && msg.contains("line 4, column"),
                "{msg}"
            );
        }
        other => panic!("expected a parse error at line 4, got {other:?}"),
    }
    let missing = dir.path().join("missing.ipynb");
    assert!(matches!(
        execute(opts(missing)).await,
        Err(Error::Read { .. })
    ));

    let good = dir.path().join("good.ipynb");
    let original = write_json(&good, &notebook(vec![code("a", "1")]));
    let mut o = opts(good.clone());
    o.output = Output::File(dir.path().join("no/such/dir/out.ipynb"));
    match execute(o).await {
        Err(e @ Error::Write { .. }) => {
            assert!(e.to_string().contains("no/such/dir/out.ipynb"), "{e}")
        }
        Err(e) => panic!("expected a write error before the session, got {e}"),
        Ok(_) => panic!("expected a write error"),
    }
    let mut o = opts(good.clone());
    o.output = Output::File(dir.path().to_path_buf());
    assert!(matches!(execute(o).await, Err(Error::Write { .. })));
    // Valid input: the (bogus) runtime is the first thing to fail.
    match execute(opts(good.clone())).await {
        Err(Error::Usage(m)) => assert!(m.contains("no-such-runtime"), "{m}"),
        other => panic!("expected the runtime to be refused, got {other:?}"),
    }
    assert_eq!(std::fs::read(&good).unwrap(), original);
    // A document without code needs no session (the bogus runtime is never asked for).
    let prose = dir.path().join("prose.md");
    std::fs::write(&prose, "# Only prose\n\n```json\n{}\n```\n").unwrap();
    let report = execute(opts(prose)).await.expect("no session needed");
    assert_eq!(report.runtime, "none");
    let text = String::from_utf8(report.document.unwrap()).unwrap();
    assert!(
        text.starts_with("# Only prose\n\n```json\n{}\n```\n"),
        "{text}"
    );
    // No temp files left behind by the write probes.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".sparkla")),
        "{names:?}"
    );
}

#[test]
fn atomic_write_replaces_whole_files_and_keeps_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir();
    let path = dir.path().join("doc.ipynb");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    // A reader holding the old file keeps the old content: the new one is a new inode.
    let old_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    sparkla_documents::write_atomic(&path, b"new content").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new content");
    let meta = std::fs::metadata(&path).unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&meta),
        old_inode,
        "renamed into place"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "no temp file left");
    // A failed write leaves the target as it was.
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("x.md"), "keep").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    if !is_root() {
        assert!(sparkla_documents::write_atomic(&ro.join("x.md"), b"lost").is_err());
        assert_eq!(std::fs::read(ro.join("x.md")).unwrap(), b"keep");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
}
