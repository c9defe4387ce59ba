//! `nodetunnel dev`: start it, run the commands it prints exactly as
//! printed, check their answers, then stop it with SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Kills the dev process if the test ends early.
struct Dev {
    child: Option<std::process::Child>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run a printed command line through `sh -c`, as a user pasting it would.
fn run(line: &str) -> (bool, String) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(line)
        .output()
        .expect("run sh");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn dev_prints_commands_that_work_as_printed_and_exits_0_on_sigint() {
    assert!(
        std::path::Path::new("/usr/bin/curl").exists(),
        "curl is needed (bash .ci/run installs it)"
    );
    let child = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["--log-level", "warn", "dev", "--nodes", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nodetunnel dev");
    let mut dev = Dev { child: Some(child) };
    let stdout = dev.child.as_mut().unwrap().stdout.take().unwrap();
    // The banner ends with the Ctrl-C line; read it on a thread so a
    // silent process fails the test at the deadline instead of hanging.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no complete banner; got {banner:#?}"));
        let done = line.starts_with("Ctrl-C stops everything");
        banner.push(line);
        if done {
            break;
        }
    }
    let commands: Vec<&str> = banner
        .iter()
        .filter(|l| l.starts_with("  curl") || l.starts_with("  /"))
        .map(|l| l.trim())
        .filter(|l| !l.contains(" top "))
        .collect();
    let expect = |needle: &str, answer: &str| {
        let line = commands
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no printed command with {needle:?}: {banner:#?}"));
        let (ok, out) = run(line);
        assert!(ok, "`{line}` failed:\n{out}");
        assert!(
            out.contains(answer),
            "`{line}` answered:\n{out}\nexpected {answer:?}"
        );
    };
    expect("10.240.0.11:10250/healthz", "ok");
    expect(
        "/containerLogs/default/web/nginx",
        "log line 1 (kubelet of node-2)",
    );
    expect("10.244.2.10:80/", "hello from pod web-node-2 on node-2");
    expect("--socks5-hostname", "service answered by a pod on node-");
    expect(" status --admin ", "3/3 nodes ready");
    expect(
        "/metrics",
        "nodetunnel_ssh_handshakes_total{result=\"ok\"} 3",
    );
    expect(" check --config ", "kubelet");
    expect(
        " route --config ",
        "-> node node-2 (rule pod-cidr 10.244.2.0/24)",
    );

    let dir_line = banner.last().unwrap().clone();
    let dir = dir_line
        .trim_start_matches("Ctrl-C stops everything and removes ")
        .trim_end_matches('.');
    assert!(std::path::Path::new(dir).exists(), "{dir}");

    let mut child = dev.child.take().unwrap();
    let pid = child.id();
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let status = match exited.recv_timeout(Duration::from_secs(30)) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("dev did not exit within 30 s of SIGINT");
        }
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
}
