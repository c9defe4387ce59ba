//! `nodetunnel check` against a real OpenSSH sshd on loopback and a kubelet
//! stand-in (HTTPS, self-signed): a healthy node passes all eight steps; a
//! wrong or unknown host key, an unauthorised key, nothing listening and a
//! closed kubelet port each fail at their step with its exit status and a
//! hint; `--all` checks every node and ends with a summary table.
//!
//! Needs root (sshd) and /usr/sbin/sshd.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use russh::keys::{HashAlg, PublicKey};

use support::*;

const NODETUNNEL: &str = env!("CARGO_BIN_EXE_nodetunnel");

/// A temp dir with a client key; writes configs for nodes on loopback.
struct Setup {
    dir: tempfile::TempDir,
    key: ClientKey,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("nt-check-")
            .tempdir()
            .expect("temp dir");
        let key = ClientKey::generate(dir.path()).expect("client key");
        Setup { dir, key }
    }

    fn sshd(&self, authorized: bool) -> Sshd {
        let authorized_keys = if authorized {
            vec![self.key.public_line.clone()]
        } else {
            Vec::new()
        };
        Sshd::start(SshdOptions {
            authorized_keys,
            ..SshdOptions::default()
        })
        .unwrap_or_else(|e| panic!("starting sshd: {e:#}"))
    }

    /// Write `<tag>.toml` and `<tag>.known_hosts` (the given lines) with a
    /// node per `(name, port)` on 127.0.0.1.
    fn config(&self, tag: &str, known_hosts: &[String], nodes: &[(&str, u16)]) -> PathBuf {
        let kh = self.dir.path().join(format!("{tag}.known_hosts"));
        std::fs::write(&kh, known_hosts.join("\n") + "\n").expect("known_hosts");
        let mut text = format!(
            r#"[ssh]
user = {user:?}
identity = {identity:?}
known_hosts = {kh:?}
connect_timeout = "5s"
handshake_timeout = "10s"
auth_timeout = "10s"
channel_open_timeout = "10s"
"#,
            user = Sshd::user(),
            identity = self.key.private_path,
        );
        for (name, port) in nodes {
            text.push_str(&format!(
                "\n[[nodes]]\nname = {name:?}\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n"
            ));
        }
        let path = self.dir.path().join(format!("{tag}.toml"));
        std::fs::write(&path, text).expect("config");
        path
    }
}

/// `nodetunnel check --config CONFIG ARGS...`: (exit status, stdout, stderr).
fn check(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = assert_cmd::Command::new(NODETUNNEL)
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("NO_COLOR")
        .timeout(Duration::from_secs(60))
        .output()
        .expect("running nodetunnel check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The step lines (`  ✓ name ...`), in order.
fn steps(stdout: &str) -> Vec<(char, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("  ")?;
            let mark = l.chars().next()?;
            if !['✓', '✗', '-'].contains(&mark) {
                return None;
            }
            Some((mark, l.chars().skip(2).collect::<String>()))
        })
        .collect()
}

/// The marks of the eight steps, e.g. "✓✓✓✓✗----".
fn marks(stdout: &str) -> String {
    steps(stdout).iter().map(|(m, _)| *m).collect()
}

fn fingerprint(openssh_line: &str) -> String {
    PublicKey::from_openssh(openssh_line)
        .expect("an OpenSSH public key")
        .fingerprint(HashAlg::Sha256)
        .to_string()
}

fn kubelet() -> ServerHandle {
    spawn_local(ServerKind::kubelet(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        "node-1",
    ))
    .expect("kubelet stand-in")
}

#[test]
fn a_healthy_node_passes_every_step() {
    let setup = Setup::new();
    let sshd = setup.sshd(true);
    let kubelet = kubelet();
    let config = setup.config("ok", &[sshd.known_hosts_line()], &[("node-1", sshd.port())]);
    let port = kubelet.port().to_string();

    let (code, stdout, stderr) = check(&config, &["node-1", "--kubelet-port", &port]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(marks(&stdout), "✓✓✓✓✓✓✓✓", "{stdout}");
    let names: Vec<String> = steps(&stdout)
        .iter()
        .map(|(_, rest)| rest.split("  ").next().unwrap_or("").trim().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "resolve",
            "tcp connect",
            "ssh banner",
            "key exchange",
            "host key",
            "authentication",
            "direct-tcpip",
            "kubelet /healthz"
        ]
    );
    assert!(
        stdout.starts_with(&format!(
            "nodetunnel check node-1: 127.0.0.1:{} as ",
            sshd.port()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("SSH-2.0-OpenSSH"), "{stdout}");
    assert!(stdout.contains("kex "), "{stdout}");
    assert!(
        stdout.contains(&fingerprint(sshd.host_key_public_line())),
        "the host key step shows the fingerprint: {stdout}"
    );
    assert!(stdout.contains("HTTP 200 \"ok\""), "{stdout}");
    assert!(stdout.contains("all 8 steps passed"), "{stdout}");
    assert!(!stdout.contains('\x1b'), "no colour without a terminal");

    // --json: one document, the same verdict.
    let (code, stdout, stderr) = check(&config, &["node-1", "--kubelet-port", &port, "--json"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(report["target"], "node-1", "{stdout}");
    assert_eq!(report["passed"], true, "{stdout}");
    assert_eq!(report["exit_code"], 0, "{stdout}");
    assert!(report["failed_step"].is_null(), "{stdout}");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 8, "{stdout}");
    assert!(
        steps
            .iter()
            .all(|s| s["outcome"] == "passed" && s["duration_ms"].is_number()),
        "{stdout}"
    );
    assert_eq!(steps[7]["step"], "kubelet /healthz", "{stdout}");

    // --kubelet-ca: the kubelet's certificate verified, as the apiserver
    // does with --kubelet-certificate-authority.
    let ca = setup.dir.path().join("kubelet-ca.pem");
    std::fs::write(&ca, kubelet.tls_cert_pem().expect("kubelet cert")).unwrap();
    let ca_arg = ca.to_str().unwrap();
    let (code, stdout, stderr) = check(
        &config,
        &["node-1", "--kubelet-port", &port, "--kubelet-ca", ca_arg],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("certificate verified against {ca_arg}")),
        "{stdout}"
    );
    // A CA that did not sign it: step 8 fails and says why.
    let other = setup.dir.path().join("other-ca.pem");
    let other_cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(&other, other_cert.cert.pem()).unwrap();
    let (code, stdout, _) = check(
        &config,
        &[
            "node-1",
            "--kubelet-port",
            &port,
            "--kubelet-ca",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 10, "{stdout}");
    assert_eq!(marks(&stdout), "✓✓✓✓✓✓✓✗", "{stdout}");
    assert!(stdout.contains("does not verify against"), "{stdout}");
    // No such file: a usage error naming it.
    let (code, _, stderr) = check(&config, &["node-1", "--kubelet-ca", "/nonexistent/ca.pem"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--kubelet-ca /nonexistent/ca.pem"),
        "{stderr}"
    );

    // The same node by address:port.
    let by_address = format!("127.0.0.1:{}", sshd.port());
    let (code, stdout, _) = check(&config, &[&by_address, "--kubelet-port", &port]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("(node node-1)"), "{stdout}");

    // Nothing on the kubelet port: the channel open fails at step 7.
    let closed = free_loopback_port().unwrap().to_string();
    let (code, stdout, _) = check(&config, &["node-1", "--kubelet-port", &closed]);
    assert_eq!(code, 9, "{stdout}");
    assert_eq!(marks(&stdout), "✓✓✓✓✓✓✗-", "{stdout}");
    assert!(
        stdout.contains("hint: nothing listens on 127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAILED at direct-tcpip (exit 9)"),
        "{stdout}"
    );
}

#[test]
fn host_key_problems_stop_before_authentication() {
    let setup = Setup::new();
    let sshd = setup.sshd(true);
    let impostor = ClientKey::generate_named(setup.dir.path(), "impostor").unwrap();
    let mut parts = impostor.public_line.split_whitespace();
    let other_key = format!(
        "{} {}",
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default()
    );
    let wrong_line = format!("[127.0.0.1]:{} {other_key}", sshd.port());
    let config = setup.config(
        "wrong",
        std::slice::from_ref(&wrong_line),
        &[("node-1", sshd.port())],
    );

    let (code, stdout, stderr) = check(&config, &["node-1"]);
    assert_eq!(code, 7, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(marks(&stdout), "✓✓✓✓✗---", "{stdout}");
    assert!(stdout.contains("✗ host key"), "{stdout}");
    assert!(stdout.contains("HOST KEY MISMATCH"), "{stdout}");
    // Both fingerprints, the file:line and the known_hosts line itself.
    assert!(
        stdout.contains(&fingerprint(sshd.host_key_public_line())),
        "presented fingerprint: {stdout}"
    );
    assert!(
        stdout.contains(&fingerprint(&impostor.public_line)),
        "expected fingerprint: {stdout}"
    );
    assert!(stdout.contains("wrong.known_hosts:1"), "{stdout}");
    assert!(stdout.contains(&wrong_line), "{stdout}");
    // The replacement line for a reinstalled node.
    assert!(
        stdout.contains(&sshd.known_hosts_line()),
        "the line to put instead: {stdout}"
    );

    // A host known_hosts does not list at all (strict).
    let config = setup.config("unknown", &[], &[("node-1", sshd.port())]);
    let (code, stdout, _) = check(&config, &["node-1"]);
    assert_eq!(code, 7, "{stdout}");
    assert!(stdout.contains("is not in"), "{stdout}");
    assert!(
        stdout.contains(&sshd.known_hosts_line()),
        "the line to add: {stdout}"
    );

    // Nothing was offered to the untrusted host.
    let log = sshd.log();
    assert!(
        !log.contains("publickey"),
        "no authentication attempt after a host key failure; sshd log:\n{log}"
    );
}

#[test]
fn auth_and_connection_failures_name_their_step() {
    let setup = Setup::new();
    let locked = setup.sshd(false);
    let closed = free_loopback_port().unwrap();
    let config = setup.config(
        "fail",
        &[locked.known_hosts_line()],
        &[("locked", locked.port()), ("gone", closed)],
    );

    let (code, stdout, stderr) = check(&config, &["locked"]);
    assert_eq!(code, 8, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(marks(&stdout), "✓✓✓✓✓✗--", "{stdout}");
    assert!(stdout.contains("✗ authentication"), "{stdout}");
    assert!(stdout.contains("was refused"), "{stdout}");
    let key_blob = setup.key.public_line.split_whitespace().nth(1).unwrap();
    assert!(
        stdout.contains(key_blob),
        "the hint gives the authorized_keys line: {stdout}"
    );
    assert!(
        stdout.contains("FAILED at authentication (exit 8)"),
        "{stdout}"
    );

    let (code, stdout, stderr) = check(&config, &["gone"]);
    assert_eq!(code, 4, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(marks(&stdout), "✓✗------", "{stdout}");
    assert!(stdout.contains("✗ tcp connect"), "{stdout}");
    assert!(stdout.contains("refused"), "{stdout}");
    assert!(stdout.contains("hint: nothing listens on"), "{stdout}");
    assert!(stdout.contains("skipped"), "{stdout}");

    // Usage errors: an unreadable config, no target.
    let (code, _, stderr) = check(Path::new("/nonexistent/nodetunnel.toml"), &["x"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = check(&config, &[]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn all_checks_every_node_and_ends_with_a_summary() {
    let setup = Setup::new();
    let sshd = setup.sshd(true);
    let kubelet = kubelet();
    let closed = free_loopback_port().unwrap();
    let config = setup.config(
        "all",
        &[sshd.known_hosts_line()],
        &[("node-a", sshd.port()), ("node-b", closed)],
    );
    let port = kubelet.port().to_string();
    let (code, stdout, stderr) = check(&config, &["--all", "--kubelet-port", &port]);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    // The failed node step by step, then the table, failures first.
    let table = stdout.find("NODE").expect("a summary table");
    assert!(
        stdout[..table].contains("nodetunnel check node-b"),
        "{stdout}"
    );
    assert!(
        !stdout[..table].contains("nodetunnel check node-a"),
        "{stdout}"
    );
    let rows: Vec<&str> = stdout[table..].lines().collect();
    assert!(
        rows[1].starts_with("node-b")
            && rows[1].contains("FAILED")
            && rows[1].contains("tcp connect"),
        "{stdout}"
    );
    assert!(
        rows[2].starts_with("node-a") && rows[2].contains("ok"),
        "{stdout}"
    );
    assert_eq!(rows[3], "1/2 nodes passed every step", "{stdout}");

    // --json: every node and the count, the same exit status.
    let (code, stdout, _) = check(&config, &["--all", "--kubelet-port", &port, "--json"]);
    assert_eq!(code, 1, "{stdout}");
    let all: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(all["passed"], 1, "{stdout}");
    assert_eq!(all["total"], 2, "{stdout}");
    let node_b = &all["nodes"][1];
    assert_eq!(node_b["target"], "node-b", "{stdout}");
    assert_eq!(node_b["failed_step"], "tcp connect", "{stdout}");
    assert_eq!(node_b["exit_code"], 4, "{stdout}");
    assert_eq!(node_b["steps"][1]["outcome"], "failed", "{stdout}");
    assert!(node_b["steps"][1]["hint"].is_string(), "{stdout}");
    assert_eq!(node_b["steps"][2]["outcome"], "skipped", "{stdout}");
    assert!(node_b["steps"][2]["duration_ms"].is_null(), "{stdout}");

    // Every node fine: exit 0.
    let config = setup.config(
        "all-ok",
        &[sshd.known_hosts_line()],
        &[("node-a", sshd.port())],
    );
    let (code, stdout, _) = check(&config, &["--all", "--kubelet-port", &port]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1/1 nodes passed every step"), "{stdout}");
}

/// Step 7 dials what kube-apiserver dials: the kubelet port on the node's
/// preferred address (its first), through the tunnel. A kubelet bound to
/// that address only passes; probing loopback instead (`--kubelet-host
/// 127.0.0.1`, the old default) fails at step 7, as it should: nothing
/// the apiserver reaches listens there.
#[test]
fn the_kubelet_step_dials_the_nodes_preferred_address() {
    let setup = Setup::new();
    let sshd = setup.sshd(true);
    let kubelet = spawn_local(ServerKind::kubelet(
        SocketAddr::from(([127, 0, 0, 2], 0)),
        "node-1",
    ))
    .expect("kubelet stand-in on 127.0.0.2");
    let config = setup.config(
        "preferred",
        &[sshd.known_hosts_line()],
        &[("node-1", sshd.port())],
    );
    // The node's address is 127.0.0.2; its sshd is reached on 127.0.0.1.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "addresses = [\"127.0.0.1\"]",
        "addresses = [\"127.0.0.2\", \"127.0.0.3\"]\nssh_address = \"127.0.0.1\"",
    );
    std::fs::write(&config, text).unwrap();
    let port = kubelet.port().to_string();

    let (code, stdout, stderr) = check(&config, &["node-1", "--kubelet-port", &port]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("127.0.0.2:{port} from the node")),
        "{stdout}"
    );

    let (code, stdout, _) = check(
        &config,
        &[
            "node-1",
            "--kubelet-port",
            &port,
            "--kubelet-host",
            "127.0.0.1",
        ],
    );
    assert_eq!(code, 9, "{stdout}");
    assert_eq!(marks(&stdout), "✓✓✓✓✓✓✗-", "{stdout}");
    assert!(
        stdout.contains("kube-apiserver dials the node's preferred address, 127.0.0.2"),
        "{stdout}"
    );
}

/// `ssh-keygen ARGS` in `dir`, which must succeed.
fn ssh_keygen(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("ssh-keygen")
        .current_dir(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ssh-keygen (apt-get install openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node whose sshd presents a host certificate from a CA that
/// known_hosts trusts (`@cert-authority`): a valid one passes step 5; an
/// expired or not-yet-valid one fails step 5 saying so, with the times,
/// instead of calling the host unknown and sending the operator to compare
/// fingerprints.
#[test]
fn an_expired_host_certificate_is_named_not_called_unknown() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    ssh_keygen(
        dir,
        &[
            "-q", "-t", "ed25519", "-N", "", "-C", "host-ca", "-f", "host_ca",
        ],
    );
    let cases = [
        ("valid", "-5m:+1h"),
        ("expired", "20200101:20200102"),
        ("future", "+1d:+2d"),
    ];
    for (tag, validity) in cases {
        let key = format!("host_{tag}");
        ssh_keygen(
            dir,
            &["-q", "-t", "ed25519", "-N", "", "-C", &key, "-f", &key],
        );
        ssh_keygen(
            dir,
            &[
                "-q",
                "-s",
                "host_ca",
                "-h",
                "-I",
                &key,
                "-n",
                "127.0.0.1",
                "-V",
                validity,
                &format!("{key}.pub"),
            ],
        );
        std::fs::set_permissions(
            dir.join(&key),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let sshd = Sshd::start(SshdOptions {
            authorized_keys: vec![setup.key.public_line.clone()],
            extra_config: vec![
                format!("HostKey {}", dir.join(&key).display()),
                format!(
                    "HostCertificate {}",
                    dir.join(format!("{key}-cert.pub")).display()
                ),
            ],
            ..SshdOptions::default()
        })
        .unwrap_or_else(|e| panic!("starting sshd: {e:#}"));
        let ca = std::fs::read_to_string(dir.join("host_ca.pub")).unwrap();
        let line = format!("@cert-authority [127.0.0.1]:{} {}", sshd.port(), ca.trim());
        let config = setup.config(tag, &[line], &[("node-1", sshd.port())]);
        let (code, stdout, stderr) = check(&config, &["node-1", "--kubelet-port", "1"]);
        let host_key = steps(&stdout)
            .into_iter()
            .nth(4)
            .unwrap_or_else(|| panic!("no step 5: {stdout}\n{stderr}"));
        match tag {
            "valid" => assert_eq!(host_key.0, '✓', "{stdout}"),
            _ => {
                assert_eq!(code, 7, "{stdout}\n{stderr}");
                assert_eq!(host_key.0, '✗', "{stdout}");
                let want = if tag == "expired" {
                    "certificate has expired: valid until 2020-01-0"
                } else {
                    "certificate is not valid yet: valid from "
                };
                assert!(stdout.contains(want), "{stdout}");
                assert!(stdout.contains("must be re-issued"), "{stdout}");
                assert!(!stdout.contains("not in known_hosts"), "{stdout}");
            }
        }
    }
}
