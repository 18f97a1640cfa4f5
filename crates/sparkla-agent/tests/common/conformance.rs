//! The kernel conformance suite's checker, shared by the agent's tests and every runtime's
//! conformance tests (include it with `#[path]`). It knows nothing of transports: the caller
//! executes each step and hands the executed node to [`check_step`].

#![allow(dead_code)]

use serde_json::Value;

pub const SUITE: &str = include_str!("../kernel-conformance.json");

pub struct Case {
    pub name: String,
    pub language: String,
    pub requires: Vec<String>,
    pub steps: Vec<Value>,
}

pub fn cases() -> Vec<Case> {
    let suite: Value = serde_json::from_str(SUITE).expect("kernel-conformance.json is valid JSON");
    suite["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            language: c["language"].as_str().expect("language").to_string(),
            requires: c["requires"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            steps: c["steps"].as_array().expect("steps").clone(),
        })
        .collect()
}

/// The node to execute for a step.
pub fn step_node(language: &str, step: &Value) -> Value {
    let ty = if step["expression"] == true {
        "CodeExpression"
    } else {
        "CodeChunk"
    };
    serde_json::json!({"type": ty, "programmingLanguage": language, "text": step["code"]})
}

fn text_of(result: &Value) -> String {
    result["outputs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Check an executed node against a step's expectations.
pub fn check_step(step: &Value, result: &Value) -> Result<(), String> {
    let fail = |what: String| Err(format!("{what}\n  result: {}", abbreviate(result)));
    if result["duration"].as_f64().is_none() {
        return fail("no duration".into());
    }
    let outputs = result["outputs"].as_array().cloned().unwrap_or_default();
    if let Some(expected) = step.get("outputs") {
        if &Value::Array(outputs.clone()) != expected {
            return fail(format!("outputs differ: expected {expected}"));
        }
    }
    if let Some(expected) = step.get("output") {
        if &result["output"] != expected {
            return fail(format!("output differs: expected {expected}"));
        }
    }
    let errors = result["errors"].as_array().cloned().unwrap_or_default();
    let expected_errors = step["errors"].as_array().cloned().unwrap_or_default();
    if errors.len() != expected_errors.len() {
        return fail(format!(
            "expected {} error(s), got {}",
            expected_errors.len(),
            errors.len()
        ));
    }
    for (got, want) in errors.iter().zip(&expected_errors) {
        if got["type"] != "CodeError" {
            return fail("an error is not a CodeError".into());
        }
        if got["errorType"] != want["errorType"] {
            return fail(format!("errorType: expected {}", want["errorType"]));
        }
        let needle = want["contains"].as_str().unwrap_or("");
        let haystack = format!(
            "{}\n{}",
            got["errorMessage"].as_str().unwrap_or(""),
            got["stackTrace"].as_str().unwrap_or("")
        );
        if !haystack.contains(needle) {
            return fail(format!("error does not contain {needle:?}"));
        }
    }
    let text = text_of(result);
    for needle in step["textContains"].as_array().into_iter().flatten() {
        let needle = needle.as_str().unwrap_or("");
        if !text.contains(needle) {
            return fail(format!("text outputs do not contain {needle:?}"));
        }
    }
    for needle in step["textExcludes"].as_array().into_iter().flatten() {
        let needle = needle.as_str().unwrap_or("");
        if text.contains(needle) {
            return fail(format!("text outputs contain {needle:?}"));
        }
    }
    if let Some(max) = step["maxOutputBytes"].as_u64() {
        if text.len() as u64 > max {
            return fail(format!("{} bytes of text output, over {max}", text.len()));
        }
    }
    if let Some(types) = step.get("outputTypes") {
        let got: Vec<Value> = outputs
            .iter()
            .filter(|o| !o.is_string())
            .map(|o| o["type"].clone())
            .collect();
        if &Value::Array(got.clone()) != types {
            return fail(format!("output types {got:?}, expected {types}"));
        }
        for o in &outputs {
            if o["type"] == "ImageObject"
                && !o["contentUrl"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("data:image/png;base64,iVBOR")
            {
                return fail("an ImageObject without a PNG data URL".into());
            }
        }
    }
    Ok(())
}

/// Whether the interpreter has the Python modules a case requires.
pub fn python_has(modules: &[String]) -> bool {
    if modules.is_empty() {
        return true;
    }
    let python = std::env::var("SPARKLA_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    std::process::Command::new(python)
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn abbreviate(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 1500 {
        let mut n = 1500;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        format!("{}… ({} bytes)", &s[..n], s.len())
    } else {
        s
    }
}
