//! `ssh.certificate` against real OpenSSH sshd on loopback: a node that
//! trusts only the user CA (`TrustedUserCAKeys`, no authorized_keys entry)
//! accepts nodetunnel with a certificate `ssh-keygen -s` signed at test
//! time; a certificate replaced on disk under traffic is used by new
//! sessions (sshd logs its serial) while streams before and after the swap
//! complete byte-exact; broken, mismatched and expired replacements are
//! refused with the previous certificate kept; an expired certificate is
//! refused locally and a principal sshd does not accept is refused by
//! sshd, each with its reason in the tunnel's error and the metrics; a
//! certificate whose principals are not the login user is offered (with a
//! warning) and accepted when the node's AuthorizedPrincipalsFile maps
//! them to it.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nodetunnel::config::Config;
use nodetunnel::manager::TunnelManager;
use nodetunnel::metrics::Metrics;
use nodetunnel::node::NodeConfig;
use nodetunnel::serve::Server;
use support::manager::{echo_stream, metric, now_unix, ssh_keygen};
use support::{spawn_local, ClientKey, ServerKind, Sshd, SshdOptions};

const WAIT: Duration = Duration::from_secs(20);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A user CA, a client key and a node trusting only the CA.
struct Bed {
    dir: tempfile::TempDir,
    ca: PathBuf,
    key: ClientKey,
    /// The identity nodetunnel uses: the ed25519 `key`, or another one.
    identity: PathBuf,
    sshd: Sshd,
    signed: std::cell::Cell<u32>,
}

impl Bed {
    /// `principals_file`: the lines of an `AuthorizedPrincipalsFile` for
    /// the login user (none: sshd matches principals against the user name).
    fn start(principals_file: Option<&str>) -> Bed {
        let dir = tempfile::Builder::new()
            .prefix("nt-cert-")
            .tempdir()
            .unwrap();
        let ca = dir.path().join("user_ca");
        ssh_keygen(
            &["-q", "-t", "ed25519", "-N", "", "-C", "test-ca", "-f"]
                .iter()
                .copied()
                .chain([ca.to_str().unwrap()])
                .collect::<Vec<_>>(),
        );
        let key = ClientKey::generate(dir.path()).unwrap();
        let mut extra = vec![format!("TrustedUserCAKeys {}.pub", ca.display())];
        if let Some(lines) = principals_file {
            let file = dir.path().join("principals");
            std::fs::write(&file, format!("{lines}\n")).unwrap();
            extra.push(format!("AuthorizedPrincipalsFile {}", file.display()));
        }
        let sshd = Sshd::start(SshdOptions {
            // No authorized_keys entry: only the CA vouches for the key.
            authorized_keys: Vec::new(),
            extra_config: extra,
            ..SshdOptions::default()
        })
        .expect("start OpenSSH sshd (bash .ci/run installs openssh-server)");
        Bed {
            dir,
            ca,
            identity: key.private_path.clone(),
            key,
            sshd,
            signed: std::cell::Cell::new(0),
        }
    }

    /// A certificate signed now with `ssh-keygen -s` for `public` (an
    /// OpenSSH public key file), as its text.
    fn sign_key(&self, public: &Path, serial: u64, principals: &str, validity: &str) -> String {
        let n = self.signed.get() + 1;
        self.signed.set(n);
        let work = self.dir.path().join(format!("sign-{n}"));
        std::fs::create_dir(&work).unwrap();
        let copy = work.join("id.pub");
        std::fs::copy(public, &copy).unwrap();
        let serial = serial.to_string();
        let mut args = vec![
            "-q",
            "-s",
            self.ca.to_str().unwrap(),
            "-I",
            "nodetunnel-test",
            "-z",
            &serial,
            "-V",
            validity,
        ];
        if !principals.is_empty() {
            args.extend(["-n", principals]);
        }
        args.push(copy.to_str().unwrap());
        ssh_keygen(&args);
        std::fs::read_to_string(work.join("id-cert.pub")).unwrap()
    }

    /// A certificate for the identity.
    fn sign(&self, serial: u64, principals: &str, validity: &str) -> String {
        let public = self.identity.with_extension("pub");
        self.sign_key(&public, serial, principals, validity)
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.path().join("id_ed25519-cert.pub")
    }

    /// Replace the certificate file as issuers do: a new file renamed over it.
    fn install(&self, text: &str) {
        let tmp = self.dir.path().join(".cert.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.cert_path()).unwrap();
    }

    /// The config file, with `certificate` set when `with_cert`.
    fn config(&self, with_cert: bool) -> PathBuf {
        let path = self.dir.path().join("nodetunnel.toml");
        let certificate = if with_cert {
            format!("certificate = {:?}\n", self.cert_path())
        } else {
            String::new()
        };
        std::fs::write(
            &path,
            format!(
                "[ssh]\nuser = {user:?}\nidentity = {identity:?}\n{certificate}known_hosts = {kh:?}\n\
                 backoff_base = \"50ms\"\nbackoff_max = \"500ms\"\ndrain_timeout = \"1s\"\n\
                 [admin]\nlisten = \"\"\n\
                 [[nodes]]\nname = \"node-1\"\naddresses = [\"127.0.0.1\"]\nssh_port = {port}\n",
                user = Sshd::user(),
                identity = self.identity,
                kh = self.sshd.known_hosts_path(),
                port = self.sshd.port(),
            ),
        )
        .unwrap();
        path
    }

    fn node(&self, name: &str) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            ssh_address: None,
            pod_cidrs: Vec::new(),
            ssh_port: Some(self.sshd.port()),
            ssh_user: None,
            not_ready: false,
        }
    }

    /// sshd's "Accepted publickey" lines.
    fn accepted(&self) -> Vec<String> {
        self.sshd
            .log()
            .lines()
            .filter(|l| l.contains("Accepted publickey"))
            .map(str::to_string)
            .collect()
    }
}

async fn until_metric(
    metrics: &Metrics,
    series: &str,
    at_least: f64,
    context: impl Fn() -> String,
) {
    support::poll::until(series, WAIT, context, || async {
        (metric(metrics, series) >= at_least).then_some(())
    })
    .await
}

async fn ready(manager: &Arc<TunnelManager>, node: &str, bed: &Bed) {
    if let Err(e) = manager.wait_ready(node, WAIT).await {
        panic!("{node} not ready: {e}\nsshd log:\n{}", bed.sshd.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trusting_only_the_ca_accepts_the_certificate_and_not_the_plain_key() {
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, &Sshd::user(), "-5m:+1h"));

    // Without the certificate the same key is refused: no authorized_keys.
    let config = Config::load(&bed.config(false)).unwrap();
    let manager =
        TunnelManager::new(&config, config.routing.clone(), Arc::new(Metrics::new())).unwrap();
    manager.apply(config.nodes.clone());
    let e = manager.wait_ready("node-1", WAIT).await.unwrap_err();
    assert!(e.to_string().contains("was refused"), "{e}");
    manager.shutdown(Duration::ZERO).await;

    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    ready(&manager, "node-1", &bed).await;
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    echo_stream(&manager, "node-1", echo.port(), 1, 4 << 20, async {}).await;
    let accepted = bed.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(
        accepted[0].contains("ED25519-CERT")
            && accepted[0].contains("ID nodetunnel-test (serial 1)"),
        "{accepted:?}"
    );
    // `check` authenticates with the certificate too.
    let checked = check(&bed.config(true));
    assert!(
        checked.contains("✓ authentication")
            && checked.contains(&format!(
                "{} with certificate \"nodetunnel-test\" (serial 1, principals {}",
                Sshd::user(),
                Sshd::user()
            )),
        "{checked}"
    );
    let expiry = config_expiry(&bed);
    assert_eq!(
        metric(
            manager.metrics(),
            "nodetunnel_client_certificate_expiry_timestamp_seconds"
        ),
        expiry as f64
    );
    server.stop().await;
}

/// `nodetunnel check --config CONFIG node-1`: its stdout.
fn check(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["check", "--config"])
        .arg(config)
        .arg("node-1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// valid_before of the certificate file now, as nodetunnel reads it.
fn config_expiry(bed: &Bed) -> u64 {
    let config = Config::load(&bed.config(true)).unwrap();
    config.client_certificate.unwrap().valid_before()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_under_traffic_is_used_by_new_sessions_and_streams_complete() {
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, &Sshd::user(), "-5m:+1h"));
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    ready(&manager, "node-1", &bed).await;
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();

    // A stream on the first session spans the swap and a new session.
    echo_stream(&manager, "node-1", echo.port(), 2, 8 << 20, async {
        bed.install(&bed.sign(2, &Sshd::user(), "-5m:+2h"));
        until_metric(
            &metrics,
            "nodetunnel_client_certificate_reloads_total{result=\"ok\"}",
            1.0,
            || bed.sshd.log(),
        )
        .await;
        manager.apply(vec![bed.node("node-1"), bed.node("node-2")]);
        ready(&manager, "node-2", &bed).await;
        // A stream opened after the swap, on the new session.
        echo_stream(&manager, "node-2", echo.port(), 3, 2 << 20, async {}).await;
    })
    .await;
    // And one after the swap on the session made before it.
    echo_stream(&manager, "node-1", echo.port(), 4, 2 << 20, async {}).await;

    let accepted = bed.accepted();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(accepted[0].contains("(serial 1)"), "{accepted:?}");
    assert!(accepted[1].contains("(serial 2)"), "{accepted:?}");
    assert_eq!(manager.tunnel("node-1").unwrap().status().handshakes, 1);
    assert_eq!(manager.tunnel("node-1").unwrap().status().stream_resets, 0);
    assert_eq!(
        metric(
            &metrics,
            "nodetunnel_client_certificate_expiry_timestamp_seconds"
        ),
        config_expiry(&bed) as f64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_mismatched_and_expired_replacements_are_refused_and_the_previous_stays() {
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, &Sshd::user(), "-5m:+1h"));
    let expiry = config_expiry(&bed);
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    ready(&manager, "node-1", &bed).await;

    let other = ClientKey::generate_named(bed.dir.path(), "other").unwrap();
    let replacements = [
        (
            "malformed",
            "ssh-ed25519-cert-v01@openssh.com AAAAnot-base64\n".to_string(),
        ),
        (
            "key_mismatch",
            bed.sign_key(
                &other.private_path.with_extension("pub"),
                3,
                &Sshd::user(),
                "-5m:+1h",
            ),
        ),
        ("expired", bed.sign(4, &Sshd::user(), "20200101:20200102")),
    ];
    for (reason, text) in replacements {
        bed.install(&text);
        until_metric(
            &metrics,
            &format!("nodetunnel_client_certificate_reloads_total{{result=\"{reason}\"}}"),
            1.0,
            || bed.sshd.log(),
        )
        .await;
    }
    assert_eq!(
        metric(
            &metrics,
            "nodetunnel_client_certificate_reloads_total{result=\"ok\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "nodetunnel_client_certificate_expiry_timestamp_seconds"
        ),
        expiry as f64
    );
    // A new session still authenticates, with the first certificate.
    manager.apply(vec![bed.node("node-1"), bed.node("node-2")]);
    ready(&manager, "node-2", &bed).await;
    let accepted = bed.accepted();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(accepted[1].contains("(serial 1)"), "{accepted:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_in_use_is_refused_locally_with_its_times() {
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, &Sshd::user(), "-5m:+5s"));
    let expiry = config_expiry(&bed);
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    ready(&manager, "node-1", &bed).await;
    // Waiting for the wall clock itself: the condition is the time.
    support::poll::until("the certificate to expire", WAIT, String::new, || async {
        (now_unix() >= expiry).then_some(())
    })
    .await;
    manager.apply(vec![bed.node("node-1"), bed.node("node-2")]);
    until_metric(
        &metrics,
        "nodetunnel_client_certificate_auth_refusals_total{reason=\"expired\"}",
        1.0,
        || bed.sshd.log(),
    )
    .await;
    let status = manager.tunnel("node-2").unwrap().status();
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.starts_with("certificate not offered: ") && error.contains(" expired at "),
        "{error}"
    );
    // Never offered: sshd accepted only node-1's session.
    assert_eq!(bed.accepted().len(), 1);
    // The session made before it expired keeps running.
    assert!(manager.tunnel("node-1").unwrap().is_ready());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_sshd_does_not_accept_is_refused_by_the_node_with_the_reason() {
    let bed = Bed::start(Some("tunnel-only"));
    bed.install(&bed.sign(1, &Sshd::user(), "-5m:+1h"));
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    let metrics = manager.metrics().clone();
    until_metric(
        &metrics,
        "nodetunnel_client_certificate_auth_refusals_total{reason=\"refused_by_node\"}",
        1.0,
        || bed.sshd.log(),
    )
    .await;
    let error = manager
        .tunnel("node-1")
        .unwrap()
        .status()
        .last_error
        .unwrap_or_default();
    assert!(
        error.contains(&format!("principals {}", Sshd::user()))
            && error.contains("AuthorizedPrincipalsFile"),
        "{error}"
    );
    assert!(bed.accepted().is_empty());
    let checked = check(&bed.config(true));
    assert!(
        checked.contains("was refused")
            && checked.contains("AuthorizedPrincipalsFile, the file for")
            && checked.contains("TrustedUserCAKeys must hold the CA key SHA256:"),
        "{checked}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ecdsa_certificates_are_accepted() {
    // RSA: offered as rsa-sha2-512-cert-v01@openssh.com (vendored russh
    // patch 0018; OpenSSH refuses the SHA-1 ssh-rsa-cert-v01 name).
    let mut bed = Bed::start(None);
    let echo = spawn_local(ServerKind::echo(local(0))).unwrap();
    for (serial, kind, bits, logged) in [
        (9, "rsa", "2048", "RSA-CERT"),
        (10, "ecdsa", "256", "ECDSA-CERT"),
    ] {
        let key = bed.dir.path().join(format!("id_{kind}"));
        ssh_keygen(&[
            "-q",
            "-t",
            kind,
            "-b",
            bits,
            "-N",
            "",
            "-f",
            key.to_str().unwrap(),
        ]);
        bed.identity = key;
        bed.install(&bed.sign(serial, &Sshd::user(), "-5m:+1h"));
        let server = Server::start(&bed.config(true)).await.unwrap();
        let manager = server.manager().clone();
        ready(&manager, "node-1", &bed).await;
        echo_stream(&manager, "node-1", echo.port(), serial, 1 << 20, async {}).await;
        let accepted = bed.accepted();
        let last = accepted.last().cloned().unwrap_or_default();
        assert!(
            last.contains(logged) && last.contains(&format!("(serial {serial})")),
            "{kind}: {accepted:?}"
        );
        server.stop().await;
    }
}

#[test]
fn certificates_refused_at_load_name_the_key_and_the_reason() {
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, &Sshd::user(), "20200101:20200102"));
    let e = Config::load(&bed.config(true)).unwrap_err().to_string();
    assert!(
        e.contains(": ssh.certificate: ") && e.contains(" expired at 2020-01-02T00:00:00Z"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_the_authorized_principals_file_maps_to_the_user_are_accepted() {
    // The login user is not among the principals: nodetunnel only warns,
    // and sshd, whose AuthorizedPrincipalsFile for the user lists
    // `nodetunnel`, accepts it.
    let bed = Bed::start(Some("nodetunnel"));
    bed.install(&bed.sign(1, "nodetunnel", "-5m:+1h"));
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    ready(&manager, "node-1", &bed).await;
    let accepted = bed.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(accepted[0].contains("(serial 1)"), "{accepted:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_the_node_does_not_map_are_refused_by_the_node_naming_them() {
    // Loaded (a warning, not a refusal), offered, and refused by sshd.
    let bed = Bed::start(None);
    bed.install(&bed.sign(1, "someone-else", "-5m:+1h"));
    let server = Server::start(&bed.config(true)).await.unwrap();
    let manager = server.manager().clone();
    until_metric(
        manager.metrics(),
        "nodetunnel_client_certificate_auth_refusals_total{reason=\"refused_by_node\"}",
        1.0,
        || bed.sshd.log(),
    )
    .await;
    let error = manager
        .tunnel("node-1")
        .unwrap()
        .status()
        .last_error
        .unwrap_or_default();
    assert!(
        error.contains("principals someone-else") && error.contains("AuthorizedPrincipalsFile"),
        "{error}"
    );
    server.stop().await;
}

#[test]
fn keys_inspect_shows_what_ssh_keygen_l_shows() {
    let bed = Bed::start(None);
    let public = bed.key.private_path.with_extension("pub");
    let work = bed.dir.path().join("inspect");
    std::fs::create_dir(&work).unwrap();
    let copy = work.join("id.pub");
    std::fs::copy(&public, &copy).unwrap();
    ssh_keygen(&[
        "-q",
        "-s",
        bed.ca.to_str().unwrap(),
        "-I",
        "node tunnel",
        "-n",
        "root,admin",
        "-z",
        "42",
        "-V",
        "20300101:20300201",
        "-O",
        "clear",
        "-O",
        "permit-port-forwarding",
        "-O",
        "source-address=10.0.0.0/8",
        copy.to_str().unwrap(),
    ]);
    let cert = work.join("id-cert.pub");
    let ours = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["keys", "inspect"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ours.status.success(), "{ours:?}");
    let ours = String::from_utf8(ours.stdout).unwrap();
    let theirs = Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&cert)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let theirs = String::from_utf8(theirs.stdout).unwrap();
    // Every line matches but the validity, which we print in RFC 3339.
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with("Valid:"))
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    assert_eq!(
        lines(&ours),
        lines(&theirs),
        "ours:\n{ours}\nssh-keygen -L:\n{theirs}"
    );
    assert!(
        ours.contains("        Valid: from 2030-01-01T00:00:00Z to 2030-02-01T00:00:00Z\n"),
        "{ours}"
    );
    assert!(
        theirs.contains("Valid: from 2030-01-01T00:00:00 to 2030-02-01T00:00:00"),
        "{theirs}"
    );
}

#[test]
fn sighup_re_reads_a_certificate_the_watch_cannot_see() {
    // The configured path is a symlink to a file in another directory
    // (changes there are not seen by the watch on the link's directory):
    // SIGHUP re-reads it.
    let bed = Bed::start(None);
    let store = bed.dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let target = store.join("cert");
    std::fs::write(&target, bed.sign(1, &Sshd::user(), "-5m:+1h")).unwrap();
    std::os::unix::fs::symlink(&target, bed.cert_path()).unwrap();
    let config = bed.config(true);
    let sidecar = support::serve::ServeProcess::spawn_on_host("sighup", &config, WAIT);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dump = || format!("{}\nsshd:\n{}", sidecar.log.dump(), bed.sshd.log());
    runtime.block_on(support::poll::until(
        "serial 1 accepted",
        WAIT,
        dump,
        || async { (bed.accepted().len() == 1).then_some(()) },
    ));
    std::fs::write(&target, bed.sign(2, &Sshd::user(), "-5m:+2h")).unwrap();
    let mark = sidecar.log.len();
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    sidecar.expect(mark, WAIT, "the reload on SIGHUP", |v| {
        v["message"] == "certificate reloaded; new sessions use it" && v["serial"] == 2
    });
    sidecar.stop(WAIT);
}
