//! The kernel conformance suite (`kernel-conformance.json`) against the real agent, through
//! its byte-stream protocol, with real interpreters. One test per language; a language whose
//! interpreter is absent is reported as SKIPPED on stderr, never silently.

mod common;

use common::conformance::{cases, check_step, python_has};
use common::AgentProc;

fn run_language(language: &str) {
    let agent = AgentProc::start();
    let available: Vec<String> = agent.ready["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    drop(agent);
    let known = ["python", "bash", "javascript", "r"];
    if known.contains(&language) && !available.iter().any(|l| l == language) {
        common::skipped(&format!(
            "the {language} conformance cases: no {language} interpreter was found on this machine"
        ));
        return;
    }
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in cases().into_iter().filter(|c| {
        if known.contains(&language) {
            c.language == language
        } else {
            !known.contains(&c.language.as_str())
        }
    }) {
        if case.language == "python" && !python_has(&case.requires) {
            common::skipped(&format!(
                "{language} case {:?}: the Python modules {:?} are not installed (.ci/run installs them)",
                case.name, case.requires
            ));
            continue;
        }
        eprintln!("[{language}] {}", case.name);
        let mut agent = AgentProc::start();
        for (i, step) in case.steps.iter().enumerate() {
            let result = agent.run_step(&case.language, step, &format!("job-{i}"));
            if let Err(e) = check_step(step, &result) {
                failures.push(format!("[{language}] {} / step {}: {e}", case.name, i + 1));
                break;
            }
        }
        ran += 1;
    }
    assert!(ran > 0, "no {language} case ran");
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!("{language}: {ran} conformance case(s) passed");
}

#[test]
fn python() {
    run_language("python");
}

#[test]
fn bash() {
    run_language("bash");
}

#[test]
fn javascript() {
    run_language("javascript");
}

#[test]
fn unknown_language() {
    run_language("other");
}

#[test]
fn r() {
    run_language("r");
}
