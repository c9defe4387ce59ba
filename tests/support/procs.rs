//! Process-tree helpers (Linux /proc).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Parsed fields of /proc/PID/stat that we need: (state, ppid).
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// All (live) descendants of `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((state, ppid)) = stat(pid) {
                if state != 'Z' && state != 'X' {
                    children.push((pid, ppid));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &children {
            if pp == p && c != root && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// SIGKILL `root` and every descendant. The tree is frozen with SIGSTOP first
/// so that no process can fork a child we would miss (sshd's per-connection
/// processes call setsid(), so a process-group kill would not reach them).
/// Waits (bounded) until all are gone or zombies.
pub fn kill_tree(root: i32) {
    if root <= 1 || root == std::process::id() as i32 || !alive(root) {
        return;
    }
    let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
    let mut all: BTreeSet<i32> = BTreeSet::from([root]);
    loop {
        let mut new = false;
        for p in descendants(root) {
            if all.insert(p) {
                let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
                new = true;
            }
        }
        if !new {
            break;
        }
    }
    for &p in &all {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    wait_gone(
        &all.into_iter().collect::<Vec<_>>(),
        Duration::from_secs(10),
    );
}

/// Poll until none of `pids` is alive (zombies count as gone), or the deadline.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
