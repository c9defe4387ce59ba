//! `[ssh.issuer]` against real OpenSSH sshd on loopback: nodes that trust
//! only the user CA (`TrustedUserCAKeys`, `AuthorizedPrincipalsFile`
//! listing `nodetunnel`, no authorized_keys entry) accept nodetunnel with
//! the certificates it signs itself; the issued certificate, read back
//! with `ssh-keygen -L`, says exactly what is configured; with a validity
//! of seconds (`test_only_short_validity`), a session killed after the
//! first certificate expired comes back with a renewed one (sshd logs the
//! new serial) while a stream on another session runs across the renewals.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nodetunnel::config::Config;
use nodetunnel::manager::TunnelManager;
use nodetunnel::serve::Server;
use support::manager::{echo_stream, metric, now_unix, ssh_keygen};
use support::{spawn_local, ServerKind, Sshd, SshdOptions};

const WAIT: Duration = Duration::from_secs(20);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A user CA, nodetunnel's key, and nodes trusting only the CA.
struct Bed {
    dir: tempfile::TempDir,
    ca: PathBuf,
    identity: PathBuf,
    nodes: Vec<Sshd>,
}

impl Bed {
    fn start(nodes: usize) -> Bed {
        let dir = tempfile::Builder::new()
            .prefix("nt-issuer-")
            .tempdir()
            .unwrap();
        let ca = dir.path().join("user_ca");
        let identity = dir.path().join("id_ed25519");
        for (path, comment) in [(&ca, "test-ca"), (&identity, "nodetunnel")] {
            ssh_keygen(&[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                comment,
                "-f",
                path.to_str().unwrap(),
            ]);
        }
        // sshd maps the principal `nodetunnel` to the login user.
        let principals = dir.path().join("principals");
        std::fs::write(&principals, "nodetunnel\n").unwrap();
        let nodes = (0..nodes)
            .map(|_| {
                Sshd::start(SshdOptions {
                    authorized_keys: Vec::new(),
                    extra_config: vec![
                        format!("TrustedUserCAKeys {}.pub", ca.display()),
                        format!("AuthorizedPrincipalsFile {}", principals.display()),
                    ],
                    ..SshdOptions::default()
                })
                .expect("start OpenSSH sshd (bash .ci/run installs openssh-server)")
            })
            .collect();
        Bed {
            dir,
            ca,
            identity,
            nodes,
        }
    }

    /// The config file: `[ssh.issuer]` with `validity` (and the test
    /// floor when `short`), one node per sshd, the admin API on a free
    /// loopback port.
    fn config(&self, validity: &str, short: bool) -> PathBuf {
        let path = self.dir.path().join("nodetunnel.toml");
        let known_hosts = self.dir.path().join("known_hosts");
        let lines: String = self
            .nodes
            .iter()
            .map(|n| n.known_hosts_line() + "\n")
            .collect();
        std::fs::write(&known_hosts, lines).unwrap();
        let mut text = format!(
            "[ssh]\nuser = {user:?}\nidentity = {identity:?}\nknown_hosts = {kh:?}\n\
             backoff_base = \"50ms\"\nbackoff_max = \"500ms\"\ndrain_timeout = \"1s\"\n\
             [ssh.issuer]\nca_key = {ca:?}\nvalidity = {validity:?}\n\
             principals = [\"nodetunnel\"]\nsource_address = [\"127.0.0.0/8\", \"::1\"]\n\
             test_only_short_validity = {short}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            user = Sshd::user(),
            identity = self.identity,
            kh = known_hosts,
            ca = self.ca,
        );
        for (i, node) in self.nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[nodes]]\nname = \"node-{}\"\naddresses = [\"127.0.0.1\"]\nssh_port = {}\n",
                i + 1,
                node.port()
            ));
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// sshd's "Accepted publickey" lines.
fn accepted(sshd: &Sshd) -> Vec<String> {
    sshd.log()
        .lines()
        .filter(|l| l.contains("Accepted publickey"))
        .map(str::to_string)
        .collect()
}

/// The serial in an "Accepted publickey ... ID x (serial N) CA ..." line.
fn serial_of(line: &str) -> u64 {
    let (_, rest) = line.split_once("(serial ").expect("a serial");
    rest.split(')').next().unwrap().parse().unwrap()
}

async fn ready(manager: &Arc<TunnelManager>, node: &str, sshd: &Sshd) {
    if let Err(e) = manager.wait_ready(node, WAIT).await {
        panic!("{node} not ready: {e}\nsshd log:\n{}", sshd.log());
    }
}

/// `nodetunnel status --admin URL`: its stdout.
fn status(admin: SocketAddr) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["status", "--admin", &format!("http://{admin}")])
        .env("NO_COLOR", "1")
        .env_remove("NODETUNNEL_ADMIN")
        .env_remove("NODETUNNEL_ADMIN_UDS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trusting_only_the_ca_accepts_an_issued_certificate() {
    let bed = Bed::start(1);
    let sshd = &bed.nodes[0];
    let server = Server::start(&bed.config("1h", false)).await.unwrap();
    let manager = server.manager().clone();
    ready(&manager, "node-1", sshd).await;
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    echo_stream(&manager, "node-1", echo.port(), 7, 1 << 20, async {}).await;

    let issued = manager
        .current_certificate()
        .expect("an issued certificate");
    let lines = accepted(sshd);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("ED25519-CERT")
            && lines[0].contains(&format!(
                "ID {} (serial {})",
                issued.key_id(),
                issued.serial()
            )),
        "{lines:?}"
    );
    assert!(issued.key_id().starts_with("nodetunnel@"));
    assert_eq!(
        metric(
            manager.metrics(),
            "nodetunnel_client_certificate_expiry_timestamp_seconds"
        ),
        issued.valid_before() as f64
    );
    // `check` authenticates with a certificate it issues the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["check", "--config"])
        .arg(bed.config("1h", false))
        .arg("node-1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&out.stdout);
    assert!(
        checked.contains("✓ authentication")
            && checked.contains("with certificate \"nodetunnel@")
            && checked.contains("principals nodetunnel"),
        "{checked}"
    );
    // status shows it.
    let admin = server.listeners().admin_tcp.unwrap();
    let shown = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    assert!(
        shown.contains(&format!(
            "certificate {:?} serial {}, principals nodetunnel, expires ",
            issued.key_id(),
            issued.serial()
        )),
        "{shown}"
    );
    server.stop().await;
}

#[test]
fn the_issued_certificate_read_back_with_ssh_keygen_l_has_exactly_what_is_configured() {
    let bed = Bed::start(0);
    let before = now_unix();
    let config = Config::load(&bed.config("2h", false)).unwrap();
    let after = now_unix();
    let issued = config.client_certificate.expect("issued at load");
    let file = bed.dir.path().join("issued-cert.pub");
    std::fs::write(&file, issued.certificate.to_openssh().unwrap()).unwrap();
    let shown = ssh_keygen(&["-L", "-f", file.to_str().unwrap()]);
    let lines: Vec<&str> = shown.lines().map(str::trim).collect();
    let after_heading = |heading: &str| -> Vec<&str> {
        let at = lines
            .iter()
            .position(|l| *l == heading)
            .unwrap_or_else(|| panic!("{heading}: {shown}"));
        lines[at + 1..]
            .iter()
            .take_while(|l| !l.ends_with(':') && !l.contains(": "))
            .copied()
            .collect()
    };
    assert!(
        lines.contains(&"Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
        "{shown}"
    );
    assert!(
        lines.contains(&format!("Key ID: \"{}\"", issued.key_id()).as_str()),
        "{shown}"
    );
    assert!(
        lines.contains(&format!("Serial: {}", issued.serial()).as_str()),
        "{shown}"
    );
    assert_eq!(after_heading("Principals:"), ["nodetunnel"], "{shown}");
    assert_eq!(
        after_heading("Critical Options:"),
        ["source-address 127.0.0.0/8,::1/128"],
        "{shown}"
    );
    assert_eq!(
        after_heading("Extensions:"),
        ["permit-port-forwarding"],
        "{shown}"
    );
    // Valid from a minute before issuance to 2h after it.
    let valid = lines
        .iter()
        .find_map(|l| l.strip_prefix("Valid: from "))
        .unwrap_or_else(|| panic!("{shown}"));
    let (from, to) = valid.split_once(" to ").unwrap();
    let unix = |text: &str| {
        humantime::parse_rfc3339(&format!("{text}Z"))
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let (from, to) = (unix(from), unix(to));
    assert_eq!(to - from, 2 * 3600 + 60, "{shown}");
    assert!(
        (before - 60..=after - 60).contains(&from),
        "{from} not a minute before {before}..{after}"
    );
}

#[test]
fn a_validity_under_a_minute_needs_the_test_knob_and_certificate_and_issuer_exclude_each_other() {
    let bed = Bed::start(0);
    let e = Config::load(&bed.config("3s", false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(": ssh.issuer.validity: must be at least 1m"),
        "{e}"
    );
    let path = bed.config("1h", false);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[ssh]\n",
        "[ssh]\ncertificate = \"id_ed25519-cert.pub\"\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains(": ssh.issuer: ssh.certificate and [ssh.issuer] are mutually exclusive"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_after_expiry_reconnects_with_a_renewed_certificate_and_streams_survive() {
    let bed = Bed::start(2);
    let server = Server::start(&bed.config("3s", true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    ready(&manager, "node-1", &bed.nodes[0]).await;
    ready(&manager, "node-2", &bed.nodes[1]).await;
    let first = manager.current_certificate().unwrap();
    let node2 = &bed.nodes[1];
    let logs = || format!("node-2 sshd:\n{}", node2.log());
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();

    // A stream on node-1's session runs across several renewals.
    echo_stream(&manager, "node-1", echo.port(), 7, 4 << 20, async {
        // The wall clock is the condition: the first certificate expires.
        support::poll::until("the first certificate to expire", WAIT, logs, || async {
            (now_unix() >= first.valid_before()).then_some(())
        })
        .await;
        support::poll::until("two renewals", WAIT, logs, || async {
            (metric(
                &metrics,
                "nodetunnel_client_certificate_renewals_total{result=\"ok\"}",
            ) >= 2.0)
                .then_some(())
        })
        .await;
        // Kill node-2's session: sshd's per-connection processes.
        let pid: i32 = std::fs::read_to_string(node2.dir().join("sshd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let sessions = support::procs::descendants(pid);
        assert!(!sessions.is_empty(), "no session process under sshd {pid}");
        for session in sessions {
            support::procs::kill_tree(session);
        }
        support::poll::until(
            "node-2 back with a renewed certificate",
            WAIT,
            logs,
            || async {
                (accepted(node2).len() >= 2 && manager.tunnel("node-2")?.is_ready()).then_some(())
            },
        )
        .await;
    })
    .await;

    let lines = accepted(node2);
    // The session made after the first certificate expired authenticated
    // (sshd accepted it: valid then) with a new serial (a loaded machine
    // may have made node-2's first session with a renewed one already).
    let renewed = serial_of(&lines[1]);
    assert!(
        renewed > serial_of(&lines[0]) && renewed > first.serial(),
        "{lines:?}"
    );
    // The stream's session never dropped.
    let node1 = manager.tunnel("node-1").unwrap().status();
    assert_eq!(node1.handshakes, 1);
    assert_eq!(node1.stream_resets, 0);
    assert_eq!(accepted(&bed.nodes[0]).len(), 1);
    assert_eq!(
        metric(
            &metrics,
            "nodetunnel_client_certificate_auth_refusals_total{reason=\"expired\"}"
        ),
        0.0
    );
    server.stop().await;
}

/// The `Match User nodetunnel` block of docs/operations.md ("Prepare the
/// nodes"), as written there.
fn documented_match_block() -> String {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let start = docs
        .find("Match User nodetunnel\n    AuthenticationMethods")
        .expect("the Match block in docs/operations.md");
    let end = start + docs[start..].find("```").unwrap();
    docs[start..end].to_string()
}

/// `ssh OPTIONS USER@127.0.0.1 COMMAND` (openssh-client) to `sshd` with
/// the identity and the certificate, bounded by `timeout 20`: (exit code,
/// stdout, stderr).
fn ssh_client(
    bed: &Bed,
    sshd: &Sshd,
    cert: &Path,
    options: &[&str],
    command: &[&str],
) -> (i32, String, String) {
    let known_hosts = bed.dir.path().join("known_hosts");
    let out = Command::new("timeout")
        .arg("20")
        .arg("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(&bed.identity)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert.display()))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-p",
        ])
        .arg(sshd.port().to_string())
        .args(options)
        .arg(format!("{}@127.0.0.1", Sshd::user()))
        .args(command)
        .output()
        .expect("ssh (openssh-client) runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_match_block_accepts_the_tunnel_and_refuses_a_shell_a_pty_and_a_remote_forward(
) {
    let mut bed = Bed::start(1);
    // The block as documented, for the test's login user, after the
    // defaults (a Match block runs to the end of the file).
    let block = documented_match_block().replace(
        "Match User nodetunnel",
        &format!("Match User {}", Sshd::user()),
    );
    let sshd = &mut bed.nodes[0];
    let mut config = std::fs::read_to_string(sshd.config_path()).unwrap();
    config.push_str(&block);
    std::fs::write(sshd.config_path(), config).unwrap();
    sshd.restart().unwrap();

    // The tunnel works.
    let config_path = bed.config("1h", false);
    let issued = Config::load(&config_path)
        .unwrap()
        .client_certificate
        .unwrap();
    let server = Server::start(&config_path).await.unwrap();
    let manager = server.manager().clone();
    ready(&manager, "node-1", &bed.nodes[0]).await;
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    echo_stream(&manager, "node-1", echo.port(), 7, 1 << 20, async {}).await;
    server.stop().await;

    // The same certificate with OpenSSH's client: authenticated, then a
    // shell, a PTY and a remote forward are refused.
    let cert = bed.dir.path().join("issued-cert.pub");
    std::fs::write(&cert, issued.certificate.to_openssh().unwrap()).unwrap();
    let sshd = &bed.nodes[0];
    let (code, stdout, stderr) = ssh_client(&bed, sshd, &cert, &["-T"], &["echo", "shell-ran"]);
    assert!(
        code != 0 && !stdout.contains("shell-ran") && !stderr.contains("Permission denied"),
        "command: exit {code}, stdout {stdout:?}, stderr {stderr:?}"
    );
    let (code, stdout, stderr) = ssh_client(&bed, sshd, &cert, &["-tt"], &["echo", "pty-ran"]);
    assert!(
        code != 0
            && !stdout.contains("pty-ran")
            && stderr.contains("PTY allocation request failed"),
        "pty: exit {code}, stdout {stdout:?}, stderr {stderr:?}"
    );
    let (code, _, stderr) = ssh_client(
        &bed,
        sshd,
        &cert,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "0:127.0.0.1:9",
        ],
        &[],
    );
    assert!(
        code == 255 && stderr.contains("remote port forwarding failed"),
        "remote forward: exit {code}, stderr {stderr:?}"
    );
    // Each of the three authenticated with the certificate (refused after,
    // not at, authentication).
    let logins = accepted(sshd)
        .iter()
        .filter(|l| l.contains(&format!("(serial {})", issued.serial())))
        .count();
    assert_eq!(logins, 3, "{}", sshd.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_is_counted_and_retried_and_the_previous_certificate_stays_until_it_expires(
) {
    use std::os::unix::fs::PermissionsExt;
    let bed = Bed::start(1);
    let server = Server::start(&bed.config("3s", true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    let admin = server.listeners().admin_tcp.unwrap();
    ready(&manager, "node-1", &bed.nodes[0]).await;
    let logs = || bed.nodes[0].log();
    // A CA key others can read is refused at each renewal.
    std::fs::set_permissions(&bed.ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let first = manager.current_certificate().unwrap();
    support::poll::until("a failed renewal", WAIT, logs, || async {
        (metric(
            &metrics,
            "nodetunnel_client_certificate_renewals_total{result=\"ca_key\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    support::poll::until("the first certificate to expire", WAIT, logs, || async {
        (now_unix() >= first.valid_before()).then_some(())
    })
    .await;
    // Nothing replaced it: still in use, and status warns.
    assert_eq!(
        manager.current_certificate().unwrap().serial(),
        first.serial()
    );
    let shown = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    assert!(
        shown.contains(&format!(
            "WARNING: certificate {:?} serial {} expired at ",
            first.key_id(),
            first.serial()
        )) && shown.contains("new sessions cannot authenticate"),
        "{shown}"
    );
    // The session made before keeps running (readiness is unchanged).
    assert!(manager.tunnel("node-1").unwrap().is_ready());
    // Fixed: a retry issues a new certificate.
    std::fs::set_permissions(&bed.ca, std::fs::Permissions::from_mode(0o600)).unwrap();
    support::poll::until(
        "a renewal after the CA key was fixed",
        Duration::from_secs(90),
        logs,
        || async {
            let current = manager.current_certificate()?;
            (current.serial() > first.serial()).then_some(())
        },
    )
    .await;
    assert!(
        metric(
            &metrics,
            "nodetunnel_client_certificate_renewals_total{result=\"ok\"}"
        ) >= 1.0
    );
    let shown = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    assert!(!shown.contains("WARNING"), "{shown}");
    server.stop().await;
}

#[test]
fn sighup_issues_a_new_certificate_for_the_identity_in_use() {
    let bed = Bed::start(1);
    let config = bed.config("1h", false);
    let sidecar = support::serve::ServeProcess::spawn_on_host("sighup", &config, WAIT);
    let first = sidecar.expect(0, WAIT, "authenticating with a user certificate", |v| {
        v["message"] == "authenticating with a user certificate"
    });
    let first = sidecar.event(first)["serial"].as_u64().expect("a serial");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(support::poll::until(
        "the first certificate accepted",
        WAIT,
        || format!("{}\nsshd:\n{}", sidecar.log.dump(), bed.nodes[0].log()),
        || async { (accepted(&bed.nodes[0]).len() == 1).then_some(()) },
    ));
    let mark = sidecar.log.len();
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    let issued = sidecar.expect(mark, WAIT, "a certificate issued on SIGHUP", |v| {
        v["message"] == "certificate issued (SIGHUP); new sessions use it"
    });
    let second = sidecar.event(issued)["serial"].as_u64().expect("a serial");
    assert!(second > first, "{second} after {first}");
    sidecar.stop(WAIT);
}

/// The same node without `TrustedUserCAKeys`: the issued certificate is
/// refused by sshd, and `check` fails at authentication naming what the
/// node's sshd decides (the CA it must trust, the principals offered).
#[test]
fn a_node_that_does_not_trust_the_ca_refuses_it_and_check_says_why() {
    let bed = Bed::start(0);
    let sshd = Sshd::start(SshdOptions::default())
        .expect("start OpenSSH sshd (bash .ci/run installs openssh-server)");
    let bed = Bed {
        nodes: vec![sshd],
        ..bed
    };
    let out = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["check", "--config"])
        .arg(bed.config("1h", false))
        .arg("node-1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(8), "{checked}");
    assert!(
        checked.contains("✗ authentication") && checked.contains("was refused"),
        "{checked}"
    );
    assert!(
        checked.contains("TrustedUserCAKeys must hold the CA key")
            && checked.contains("nodetunnel"),
        "{checked}"
    );
}
