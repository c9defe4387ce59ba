//! The real `nodetunnel serve` under a lowered `RLIMIT_NOFILE` (soft and
//! hard, set by the shell that execs it): the inventory that does not fit
//! is reported once, with the need, the limit and the fix. No root, no
//! sshd: the nodes are a closed loopback port.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// The limit the sidecar runs under: the hard limit too, so that raising
/// the soft limit cannot get past it.
const LIMIT: u64 = 256;

/// More nodes than `LIMIT` descriptors hold (one session each).
const NODES: usize = 300;

/// Bound on waiting for one log line.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn an_inventory_beyond_a_lowered_limit_is_reported_once_with_the_fix() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    nodetunnel::keys::generate(dir.path(), "id_ed25519", "descriptor-test").expect("a client key");
    std::fs::write(dir.path().join("known_hosts"), "").expect("known_hosts");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // No front door and no admin API: at start the need (the spare alone)
    // fits; the inventory's sessions then do not.
    let mut config = format!(
        "[ssh]\nuser = \"test\"\nidentity = \"id_ed25519\"\nknown_hosts = \"known_hosts\"\n\
         port = {closed}\nbackoff_base = \"10s\"\n\n[admin]\nlisten = \"\"\n"
    );
    for n in 0..NODES {
        config.push_str(&format!(
            "\n[[nodes]]\nname = \"node-{n}\"\naddresses = [\"127.0.0.1\"]\n"
        ));
    }
    let config_path = dir.path().join("nodetunnel.toml");
    std::fs::write(&config_path, config).expect("the config file");

    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\""))
        .arg(NODETUNNEL)
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "serve",
            "--config",
        ])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nodetunnel serve");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, from_child) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Every line up to the sidecar's "inventory applied" (logged after the
    // check of that inventory).
    let deadline = Instant::now() + LOG_TIMEOUT;
    let mut events: Vec<Value> = Vec::new();
    let mut log = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match from_child.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("no \"inventory applied\" ({e}); log:\n{log}");
            }
        };
        log.push_str(&line);
        log.push('\n');
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let applied = event["message"] == "inventory applied";
        events.push(event);
        if applied {
            break;
        }
    }
    // Its way of stopping is not what this test is about (a SIGTERM this
    // early can land before the signal handlers are installed).
    let _ = child.kill();
    let _ = child.wait();

    let raised = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("file descriptor limit"))
        })
        .unwrap_or_else(|| panic!("no limit line:\n{log}"));
    assert_eq!(raised["soft"], format!("Some({LIMIT})"), "{raised}");
    let warnings: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("file descriptor limit is too low"))
        })
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not {}:\n{log}",
        warnings.len()
    );
    let warning = warnings[0];
    assert_eq!(warning["level"], "WARN", "{warning}");
    let needed = NODES as u64 + nodetunnel::descriptors::DESCRIPTOR_MARGIN;
    assert_eq!(warning["needed"], needed, "{warning}");
    assert_eq!(warning["nodes"], NODES, "{warning}");
    assert_eq!(warning["limit"], format!("Some({LIMIT})"), "{warning}");
    let message = warning["message"].as_str().unwrap_or_default();
    for fix in ["LimitNOFILE=", "--ulimit nofile="] {
        assert!(message.contains(fix), "{fix} missing: {message}");
    }
}
