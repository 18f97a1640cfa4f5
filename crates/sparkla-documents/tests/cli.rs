//! The command as a user runs it (the `sparkla-execute` example is `sparkla execute` without
//! the rest of the `sparkla` binary): stdout, exit statuses, the summary, --check naming the
//! differing chunk, and Ctrl-C leaving the input intact.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Sessions of these tests use the default cgroup parent of `sparkla execute`: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn command() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe
        .parent()?
        .parent()?
        .join("examples")
        .join("sparkla-execute");
    p.is_file().then_some(p)
}

fn skip_cli(test: &str) -> Option<PathBuf> {
    if skip(test) {
        return None;
    }
    let c = command();
    if c.is_none() {
        eprintln!(
            "SKIPPED: {test}: the sparkla-execute example is not built (cargo test builds it)"
        );
    }
    c
}

/// The pids of the `sparkla-execute` processes this test binary started.
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Run the command to completion, remembering its pid (its sessions are `execute-<pid>-…`).
fn run(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    STARTED.lock().unwrap().push(child.id());
    child.wait_with_output().unwrap()
}

/// Session cgroups of `sparkla execute` runs started by this test binary (runs of other
/// processes, e.g. the same tests from another checkout, are not ours to judge).
fn our_sessions() -> Vec<PathBuf> {
    let pids = STARTED.lock().unwrap().clone();
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|h| {
            std::fs::read_dir(h.path().join("sparkla-execute"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            pids.iter()
                .any(|p| name.starts_with(&format!("execute-{p}-")))
        })
        .map(|e| e.path())
        .collect()
}

fn no_sessions_left() {
    for _ in 0..250 {
        if our_sessions().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "sessions of sparkla execute left behind: {:?}",
        our_sessions()
    );
}

const DOC: &str =
    "# Doc\n\n```python\nprint(6 * 7)\n```\n\nText.\n\n```bash\necho \"$TZ $LANG\"\n```\n";

#[test]
fn stdout_exit_statuses_and_check() {
    let Some(cmd) = skip_cli("stdout_exit_statuses_and_check") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.md");
    std::fs::write(&doc, DOC).unwrap();
    let out = run(Command::new(&cmd).arg(&doc).arg("--quiet"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("```text\n42\n```") && stdout.contains("```text\nUTC C.UTF-8\n```"),
        "{stdout}"
    );
    assert!(
        stderr.contains("executed 2 of 2 chunks") && stderr.contains("0 errors"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&doc).unwrap(),
        DOC,
        "stdout mode writes nothing"
    );

    // Execute in place, then check: reproduces (exit 0); tampered: exit 1, chunk named.
    let st = run(Command::new(&cmd).arg(&doc).arg("--in-place"));
    assert!(st.status.success());
    let out = run(Command::new(&cmd).arg(&doc).arg("--check"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "--check prints no document");
    let executed = std::fs::read_to_string(&doc).unwrap();
    std::fs::write(
        &doc,
        executed.replace("```text\n42\n```", "```text\n41\n```"),
    )
    .unwrap();
    let out = run(Command::new(&cmd).arg(&doc).arg("--check"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chunk 1 (line 3) differs")
            && stderr.contains("-41")
            && stderr.contains("+42"),
        "{stderr}"
    );
    assert!(!stderr.contains("chunk 2 (line 9) differs"), "{stderr}");

    // A failing chunk: exit 1; bad input: exit 2 with the file and position.
    let bad = dir.path().join("fail.md");
    std::fs::write(
        &bad,
        "```python\n1/0\n```\n\n```python\nprint('skipped')\n```\n",
    )
    .unwrap();
    let out = run(Command::new(&cmd).arg(&bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 error (chunk 1 (line 1))") && stderr.contains("1 not executed"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ZeroDivisionError"));
    let nb = dir.path().join("broken.ipynb");
    std::fs::write(&nb, "{\"cells\": [}").unwrap();
    let out = run(Command::new(&cmd).arg(&nb));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("broken.ipynb") && stderr.contains("line 1, column 12"),
        "{stderr}"
    );
    no_sessions_left();
}

#[test]
fn ctrl_c_leaves_the_input_intact() {
    let Some(cmd) = skip_cli("ctrl_c_leaves_the_input_intact") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("slow.md");
    let text = "```python\nprint('first')\n```\n\n```python\nimport time\nprint('started', flush=True)\ntime.sleep(60)\n```\n";
    std::fs::write(&doc, text).unwrap();
    let child = Command::new(&cmd)
        .arg(&doc)
        .arg("--in-place")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    STARTED.lock().unwrap().push(child.id());
    // Ctrl-C while the slow chunk most likely runs; whenever it lands (starting the session,
    // the first chunk), the outcome must be the same: exit 130, nothing written.
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&doc).unwrap(), text, "input intact");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temp file: {names:?}");
    no_sessions_left();
}

/// `sparkla execute` killed with SIGKILL cannot end its session: the next run reclaims it
/// (and only sessions whose process is dead).
#[test]
fn the_next_run_reclaims_the_session_of_a_killed_run() {
    let Some(cmd) = skip_cli("the_next_run_reclaims_the_session_of_a_killed_run") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("slow.md");
    let text = "```python\nimport time\ntime.sleep(60)\n```\n";
    std::fs::write(&doc, text).unwrap();
    let mut child = Command::new(&cmd)
        .arg(&doc)
        .arg("--in-place")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    STARTED.lock().unwrap().push(child.id());
    let prefix = format!("execute-{}-", child.id());
    let sessions = || -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|h| {
                std::fs::read_dir(h.path().join("sparkla-execute"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sessions().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        !sessions().is_empty(),
        "the killed run's session outlives it"
    );
    assert_eq!(std::fs::read_to_string(&doc).unwrap(), text, "input intact");

    let quick = dir.path().join("quick.md");
    std::fs::write(&quick, "```bash\necho ok\n```\n").unwrap();
    let out = run(Command::new(&cmd).arg(&quick));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sessions().is_empty(), "reclaimed: {:?}", sessions());
    no_sessions_left();
}
