//! Reaping. The agent may be PID 1 of a sandbox, and it is always a child subreaper, so
//! every process orphaned inside the session ends up its child. One thread waits for them
//! all; it records the exit status of the processes the agent cares about (its kernels)
//! and discards the rest.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Processes whose status is wanted, and the status once known.
    watched: HashMap<i32, Option<libc::c_int>>,
    /// Statuses of children reaped before anyone asked to watch them (bounded).
    unclaimed: HashMap<i32, libc::c_int>,
    /// Whether any child may exist (so waitpid is worth calling).
    children: bool,
}

struct Reaper {
    state: Mutex<State>,
    changed: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    })
}

/// Start the reaping thread. Call once, before spawning anything.
pub fn start() {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            {
                let r = reaper();
                let mut st = r.state.lock().expect("reaper lock");
                while !st.children {
                    st = r.changed.wait(st).expect("reaper lock");
                }
            }
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into a valid int.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            let r = reaper();
            let mut st = r.state.lock().expect("reaper lock");
            if pid > 0 {
                if let Some(slot) = st.watched.get_mut(&pid) {
                    *slot = Some(status);
                    r.changed.notify_all();
                } else {
                    // A child that exited before `watch` was called, or an orphan.
                    if st.unclaimed.len() >= 1024 {
                        st.unclaimed.clear();
                    }
                    st.unclaimed.insert(pid, status);
                }
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                st.children = false;
            }
        })
        .expect("spawn reaper thread");
}

/// Register interest in a child, right after spawning it.
pub fn watch(pid: i32) {
    let r = reaper();
    let mut st = r.state.lock().expect("reaper lock");
    let status = st.unclaimed.remove(&pid);
    st.watched.insert(pid, status);
    st.children = true;
    r.changed.notify_all();
}

/// The exit status of a watched child, waiting up to `timeout` for it.
pub fn wait_status(pid: i32, timeout: Duration) -> Option<libc::c_int> {
    let r = reaper();
    let deadline = Instant::now() + timeout;
    let mut st = r.state.lock().expect("reaper lock");
    loop {
        if let Some(Some(status)) = st.watched.get(&pid) {
            let status = *status;
            st.watched.remove(&pid);
            return Some(status);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        st = r
            .changed
            .wait_timeout(st, deadline - now)
            .expect("reaper lock")
            .0;
    }
}

/// Whether a watched child has exited (without consuming its status).
pub fn has_exited(pid: i32) -> bool {
    let st = reaper().state.lock().expect("reaper lock");
    matches!(st.watched.get(&pid), Some(Some(_)))
}

/// Stop watching a child (its status, if any, is dropped).
pub fn forget(pid: i32) {
    reaper()
        .state
        .lock()
        .expect("reaper lock")
        .watched
        .remove(&pid);
}
