//! One SSH session to one node: connecting it (TCP, key exchange, host-key
//! verification, public-key authentication, each bounded by a timeout) and
//! the russh client handler that watches it. Authentication offers the
//! user certificate in [`SessionSettings::certificate`] when there is one
//! (checked again for this node's user first), the plain key otherwise.
//!
//! [`connect`] either returns a [`Session`] ready for direct-tcpip channels
//! or a [`ConnectError`] whose [`reason`](ConnectError::reason) is one of the
//! stable labels `timeout`, `refused`, `auth`, `host_key`, `protocol`.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::client_certificate::{self, CertificateSlot};
use crate::keys::{fingerprint, Identity};
use crate::known_hosts::{decide, HostKeyDecision, HostKeyStatus, KnownHosts, KnownHostsError};
use crate::ssh_config::HostKeyPolicy;

/// Everything a session needs that is shared by all nodes.
pub struct SessionSettings {
    /// The key to authenticate with (replaced on SIGHUP for key rotation).
    pub identity: RwLock<Arc<Identity>>,
    /// The user certificate to authenticate with (`ssh.certificate`);
    /// empty: the plain key. Read at each authentication, so a
    /// replacement installed there is used by the next session.
    pub certificate: Arc<CertificateSlot>,
    /// Trusted host keys (updated in memory when accept-new learns a key).
    pub known_hosts: RwLock<KnownHosts>,
    /// Where known_hosts lives (accept-new appends to it).
    pub known_hosts_path: std::path::PathBuf,
    /// strict | accept-new | insecure.
    pub host_key_policy: HostKeyPolicy,
    /// TCP connect bound.
    pub connect_timeout: Duration,
    /// Key exchange bound.
    pub handshake_timeout: Duration,
    /// Authentication bound.
    pub auth_timeout: Duration,
    /// russh client configuration shared by every session.
    pub russh: Arc<client::Config>,
}

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    /// Node name, for messages.
    pub node: String,
    /// Address (IP or DNS name) of the node's sshd.
    pub host: String,
    /// Port of the node's sshd.
    pub port: u16,
    /// Remote user.
    pub user: String,
}

/// Why a node's host key (or host certificate) was refused. The text is
/// what the tunnel table and the log show.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HostKeyRejection {
    /// A matching `@revoked` line lists it.
    #[error("host key of node {node} ({endpoint}) {presented} is revoked in {} line {line}", known_hosts.display())]
    Revoked {
        /// The node.
        node: String,
        /// `host:port`.
        endpoint: String,
        /// What it presented (fingerprint).
        presented: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// The `@revoked` line.
        line: usize,
    },
    /// known_hosts lists other keys for it.
    #[error("HOST KEY CHANGED for node {node} ({endpoint}): presented {presented}, known_hosts has {expected}; if the node was reinstalled, replace its line")]
    Changed {
        /// The node.
        node: String,
        /// `host:port`.
        endpoint: String,
        /// What it presented.
        presented: String,
        /// The keys known_hosts expects, with their files and lines.
        expected: String,
    },
    /// A host certificate from a trusted CA that is not valid.
    #[error("host certificate of node {node} ({endpoint}) {presented} is signed by a CA that {} trusts, but is not valid: {problem}; the node needs a valid host certificate (ssh-keygen -s CA_KEY -h), or the clocks are wrong", known_hosts.display())]
    InvalidCertificate {
        /// The node.
        node: String,
        /// `host:port`.
        endpoint: String,
        /// What it presented.
        presented: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// Why the certificate is not valid.
        problem: Box<crate::known_hosts::CertificateProblem>,
    },
    /// known_hosts does not list the host and the policy refuses unknown
    /// hosts.
    #[error("host key of node {node} ({endpoint}) {presented} is not in {} (host_key_policy = {policy}); add it, e.g. with ssh-keyscan, after checking the fingerprint", known_hosts.display())]
    Unknown {
        /// The node.
        node: String,
        /// `host:port`.
        endpoint: String,
        /// What it presented.
        presented: String,
        /// The known_hosts file.
        known_hosts: PathBuf,
        /// The policy in force.
        policy: HostKeyPolicy,
    },
    /// accept-new: another session or process recorded a different key
    /// for the host meanwhile.
    #[error("HOST KEY CHANGED for node {node} ({endpoint}): presented {presented}, but {status} (recorded meanwhile by another session or process under accept-new); if the node was reinstalled, replace its line")]
    RecordedMeanwhile {
        /// The node.
        node: String,
        /// `host:port`.
        endpoint: String,
        /// What it presented.
        presented: String,
        /// What known_hosts says now.
        status: Box<HostKeyStatus>,
    },
    /// accept-new could not write the key to known_hosts.
    #[error("accept-new could not record the host key of node {node}: {reason}")]
    NotRecorded {
        /// The node.
        node: String,
        /// The file error.
        reason: String,
    },
    /// An internal lock or task failed (a bug).
    #[error("host key check failed: {0}")]
    Internal(&'static str),
}

/// Why a session could not be established.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    /// A stage did not finish within its timeout.
    #[error("{stage} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        /// `tcp connect`, `ssh handshake` or `authentication`.
        stage: &'static str,
        /// The bound that expired.
        after: Duration,
    },
    /// The TCP connection could not be made (refused, unreachable, or the
    /// address did not resolve).
    #[error("tcp connect to {addr} failed: {reason}")]
    Refused {
        /// host:port.
        addr: String,
        /// The OS error.
        reason: String,
    },
    /// No file descriptor was left for the TCP connection (EMFILE, ENFILE):
    /// a local limit, not the node's refusal.
    #[error(
        "tcp connect to {addr} failed for lack of a local file descriptor ({reason}): \
         the node was not asked; raise the descriptor limit (systemd LimitNOFILE=, \
         ulimit -n, the container runtime's nofile limit)"
    )]
    LocalResources {
        /// host:port.
        addr: String,
        /// The OS error.
        reason: String,
    },
    /// The node's host key is not trusted.
    #[error("{0}")]
    HostKey(HostKeyRejection),
    /// The node refused our key.
    #[error("authentication as {user} with key {fingerprint} was refused{methods}")]
    Auth {
        /// Remote user.
        user: String,
        /// Our key's fingerprint.
        fingerprint: String,
        /// What the server would accept instead, if it said.
        methods: String,
    },
    /// The certificate in use was refused locally before it was offered:
    /// expired, not yet valid, or not for the identity's key (see
    /// [`client_certificate::check`]).
    #[error("certificate not offered: {message}")]
    Certificate {
        /// The [`CertificateError::reason`](client_certificate::CertificateError::reason) label.
        reason: &'static str,
        /// The refusal, with the file and the times or names involved.
        message: String,
    },
    /// The node refused our certificate (its `TrustedUserCAKeys`,
    /// `AuthorizedPrincipalsFile` or `RevokedKeys` decide).
    #[error(
        "authentication as {user} with certificate {key_id:?} (serial {serial}, principals {principals}) \
         was refused: the node's TrustedUserCAKeys, AuthorizedPrincipalsFile and RevokedKeys decide{methods}"
    )]
    CertificateRefused {
        /// Remote user.
        user: String,
        /// The certificate's key id.
        key_id: String,
        /// The certificate's serial.
        serial: u64,
        /// The principals it offered (`any` when it lists none).
        principals: String,
        /// What the server would accept instead, if it said.
        methods: String,
    },
    /// Anything else in the SSH protocol: no common algorithm, a
    /// disconnect during the handshake, a bad signature.
    #[error("ssh protocol error: {0}")]
    Protocol(String),
}

impl ConnectError {
    /// The TCP connect itself failed (refused, unreachable, timed out): the
    /// node's SSH port is closed or unreachable, and is worth probing
    /// rather than backing off from.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused { .. }
                | ConnectError::Timeout {
                    stage: "tcp connect",
                    ..
                }
        )
    }

    /// Stable label for metrics and the tunnel table.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Refused { .. } => "refused",
            ConnectError::LocalResources { .. } => "local_resources",
            ConnectError::HostKey(_) => "host_key",
            ConnectError::Auth { .. } => "auth",
            ConnectError::Certificate { .. } => "auth",
            ConnectError::CertificateRefused { .. } => "auth",
            ConnectError::Protocol(_) => "protocol",
        }
    }

    /// Every value [`reason`](Self::reason) gives, for the series exported
    /// at 0 from the start (keep in step with it).
    pub const REASONS: [&'static str; 6] = [
        "timeout",
        "refused",
        "local_resources",
        "host_key",
        "auth",
        "protocol",
    ];

    /// The error of a failed TCP connect to `addr`: out of descriptors is a
    /// local failure ([`LocalResources`](Self::LocalResources)), anything
    /// else the node's or the network's ([`Refused`](Self::Refused)).
    pub fn tcp_connect_failed(addr: &str, error: &std::io::Error) -> ConnectError {
        let out_of_descriptors = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
            .iter()
            .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()));
        if out_of_descriptors {
            ConnectError::LocalResources {
                addr: addr.to_string(),
                reason: error.to_string(),
            }
        } else {
            ConnectError::Refused {
                addr: addr.to_string(),
                reason: error.to_string(),
            }
        }
    }

    /// Why a certificate authentication was refused, for the
    /// `client_certificate_auth_refusals` metric: a
    /// [`CertificateError::reason`](client_certificate::CertificateError::reason)
    /// when refused locally, `refused_by_node` when the node refused it;
    /// `None` for every other error.
    pub fn certificate_refusal(&self) -> Option<&'static str> {
        match self {
            ConnectError::Certificate { reason, .. } => Some(reason),
            ConnectError::CertificateRefused { .. } => Some("refused_by_node"),
            _ => None,
        }
    }
}

/// An established, authenticated session.
pub struct Session {
    /// The russh handle: opens channels, sends keepalives.
    pub handle: Handle<ClientHandler>,
    /// Fires when the session ended (disconnect or I/O error).
    pub ended: Arc<SessionEnd>,
    /// Cuts the transport: ends the session and all its channels at once.
    pub cut: Arc<Severance>,
    /// How long its TCP connect took: one round trip to the node (plus the
    /// address lookup, for a name). `None` for a session over another
    /// transport.
    pub connect_rtt: Option<Duration>,
}

/// How a session ended, filled in by the handler.
#[derive(Default)]
pub struct SessionEnd {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

impl SessionEnd {
    /// Resolves once the session has ended.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Why the session ended, once it has.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().map(|r| r.clone()).unwrap_or(None)
    }

    fn set(&self, reason: String) {
        if let Ok(mut slot) = self.reason.lock() {
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.notify.notify_waiters();
    }
}

/// The russh client handler of one session: verifies the host key and
/// records how the session ends.
pub struct ClientHandler {
    settings: Arc<SessionSettings>,
    target: Target,
    rejection: Arc<Mutex<Option<HostKeyRejection>>>,
    ended: Arc<SessionEnd>,
}

impl ClientHandler {
    fn verify(&self, key: &PublicKeyOrCertificate) -> Result<Verdict, HostKeyRejection> {
        let t = &self.target;
        let policy = self.settings.host_key_policy;
        let decision = match self.settings.known_hosts.read() {
            Ok(kh) => decide(&kh, &t.host, t.port, key, policy),
            Err(_) => return Err(HostKeyRejection::Internal("known_hosts lock poisoned")),
        };
        let endpoint = format!("{}:{}", t.host, t.port);
        let known_hosts = self.settings.known_hosts_path.clone();
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => fingerprint(key),
            PublicKeyOrCertificate::Certificate(cert) => {
                format!(
                    "certificate of {}",
                    cert.public_key().fingerprint(russh::keys::HashAlg::Sha256)
                )
            }
        };
        match decision {
            HostKeyDecision::Trusted => Ok(Verdict::Trusted),
            HostKeyDecision::Insecure(_) => {
                tracing::warn!(node = %t.node, key = %presented, "host key not verified (host_key_policy = insecure)");
                Ok(Verdict::Trusted)
            }
            HostKeyDecision::Learn(key) => Ok(Verdict::Learn(key)),
            HostKeyDecision::Refuse(HostKeyStatus::Revoked { line }) => {
                Err(HostKeyRejection::Revoked {
                    node: t.node.clone(),
                    endpoint,
                    presented,
                    known_hosts,
                    line,
                })
            }
            HostKeyDecision::Refuse(HostKeyStatus::Changed { expected }) => {
                let expected = expected
                    .iter()
                    .map(|k| {
                        format!(
                            "{} ({}:{}: {})",
                            k.fingerprint,
                            k.path.display(),
                            k.line,
                            k.raw_line
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(HostKeyRejection::Changed {
                    node: t.node.clone(),
                    endpoint,
                    presented,
                    expected,
                })
            }
            HostKeyDecision::Refuse(HostKeyStatus::InvalidCertificate { problem }) => {
                Err(HostKeyRejection::InvalidCertificate {
                    node: t.node.clone(),
                    endpoint,
                    presented,
                    known_hosts,
                    problem: Box::new(problem),
                })
            }
            HostKeyDecision::Refuse(HostKeyStatus::Unknown | HostKeyStatus::Trusted) => {
                Err(HostKeyRejection::Unknown {
                    node: t.node.clone(),
                    endpoint,
                    presented,
                    known_hosts,
                    policy,
                })
            }
        }
    }
}

/// What the host-key check decided.
enum Verdict {
    /// known_hosts vouches for the key (or the policy is insecure).
    Trusted,
    /// Unknown key under accept-new: record it, then trust it.
    Learn(russh::keys::PublicKey),
}

impl ClientHandler {
    /// accept-new: append the key to known_hosts (blocking file I/O, off the
    /// async threads) and trust it in memory.
    async fn learn(&self, key: russh::keys::PublicKey) -> Result<(), HostKeyRejection> {
        let settings = self.settings.clone();
        let t = self.target.clone();
        let presented = fingerprint(&key);
        tokio::task::spawn_blocking(move || {
            let mut kh = settings
                .known_hosts
                .write()
                .map_err(|_| HostKeyRejection::Internal("known_hosts lock poisoned"))?;
            // Another session may have learned it meanwhile: the same key is
            // trusted as is; learn re-checks under its lock, and a different
            // key recorded meanwhile refuses this one as a changed key.
            if kh.check_key(&t.host, t.port, &key).is_trusted() {
                return Ok(());
            }
            match kh.learn(&t.host, t.port, &key) {
                Ok(()) => {
                    tracing::info!(node = %t.node, key = %presented, path = %settings.known_hosts_path.display(), "learned new host key (accept-new)");
                    Ok(())
                }
                Err(KnownHostsError::NoLongerUnknown { status, .. }) => {
                    Err(HostKeyRejection::RecordedMeanwhile {
                        node: t.node.clone(),
                        endpoint: format!("{}:{}", t.host, t.port),
                        presented,
                        status: Box::new(status),
                    })
                }
                Err(e) => Err(HostKeyRejection::NotRecorded {
                    node: t.node.clone(),
                    reason: e.to_string(),
                }),
            }
        })
        .await
        .map_err(|_| HostKeyRejection::Internal("the accept-new task failed"))?
    }
}

/// Reject a channel the node tried to open towards us: nodetunnel never
/// asks for forwarding, agents or X11, so any such channel is refused.
async fn refuse_node_channel(node: &str, kind: &str, reply: client::ChannelOpenHandle) {
    tracing::warn!(node = %node, kind, "node tried to open a channel towards nodetunnel; refused");
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match self.verify(server_public_key) {
            Ok(Verdict::Learn(key)) => self.learn(key).await,
            other => other.map(|_| ()),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(reason) => {
                if let Ok(mut slot) = self.rejection.lock() {
                    *slot = Some(reason);
                }
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "forwarded-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "forwarded-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "agent", reply).await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "session", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "direct-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_node_channel(&self.target.node, "x11", reply).await;
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                format!("node sent disconnect: {info:?}")
            }
            client::DisconnectReason::Error(e) => format!("session error: {e}"),
        };
        self.ended.set(text);
        Ok(())
    }
}

/// The russh client configuration nodetunnel uses: TCP_NODELAY, our own
/// keepalives (russh's are off), AES-256-GCM first where the CPU has AES-NI,
/// the window and rekey limits of `ssh`.
pub fn russh_config(
    ssh: &crate::ssh_config::SshConfig,
    host_key_certificates: bool,
) -> client::Config {
    let aes_first = cpu_has_aes();
    let cipher: &'static [russh::cipher::Name] = if aes_first {
        &[
            russh::cipher::AES_256_GCM,
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_CTR,
            russh::cipher::AES_128_CTR,
        ]
    } else {
        &[
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_256_CTR,
            russh::cipher::AES_128_CTR,
        ]
    };
    let mut preferred = russh::Preferred {
        cipher: Cow::Borrowed(cipher),
        ..russh::Preferred::default()
    };
    if host_key_certificates {
        preferred.host_key_certificates = preferred.key.clone();
    }
    // Validated to at most 1 GiB (config.rs), which russh requires.
    let rekey_limit = usize::try_from(ssh.rekey_limit)
        .unwrap_or(1 << 30)
        .min(1 << 30);
    client::Config {
        window_size: ssh.window_size,
        limits: russh::Limits::new(rekey_limit, rekey_limit, ssh.rekey_interval),
        maximum_packet_size: 32768,
        nodelay: true,
        // Per-channel flow control (vendored russh patch): a stream's window
        // is re-opened as its client reads, not on arrival.
        adjust_window_on_consume: true,
        keepalive_interval: None,
        inactivity_timeout: None,
        peer_limits: Some(peer_limits()),
        preferred,
        ..client::Config::default()
    }
}

/// What a node may ask of its session unasked, per second (vendored russh
/// patch 0017): a node that floods it with ignore/debug messages, global
/// requests or channel opens, or with key exchanges, is disconnected
/// (`peer flood: ...`) and its tunnel backs off like after any lost
/// session. A well-behaved sshd sends a handful of those messages per
/// session (host key announcements, `ClientAliveInterval` keepalives).
/// Key exchanges with little data between them (under 16 KiB) are held to
/// 8 a second; the others to 256 a second, far above what a small
/// `RekeyLimit` produces under load (`RekeyLimit 256K`: about 125 in
/// 32 MB, at most 24 in a second, some after only 33 KB as nodetunnel
/// counts them, in `tests/sshd_tunnel.rs`).
pub fn peer_limits() -> russh::PeerLimits {
    russh::PeerLimits {
        unsolicited_per_second: 256,
        rekeys_per_second: 256,
        cheap_rekeys_per_second: 8,
        rekey_min_bytes: 16 * 1024,
    }
}

fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Unsent bytes the kernel holds for a session's socket at most
/// (`TCP_NOTSENT_LOWAT`); what the streams send beyond that waits in the
/// session (at most 256 KiB, see vendor/russh/PATCHES.md) and in their own
/// queues. A channel open skips those queues but not the kernel's, so this
/// bounds how long an open waits behind bulk uploads on a slow link:
/// without it the kernel took up to its whole send buffer (megabytes).
/// Throughput is not limited by it: bytes in flight are not counted.
/// Linux only (elsewhere the kernel's queue is not bounded).
#[cfg(any(target_os = "linux", target_os = "android"))]
const UNSENT_LOWAT: u32 = 128 * 1024;

/// Connect, verify and authenticate one session to `target`.
pub async fn connect(
    settings: Arc<SessionSettings>,
    target: Target,
) -> Result<Session, ConnectError> {
    let addr = format!("{}:{}", bracket(&target.host), target.port);
    let started = tokio::time::Instant::now();
    let tcp = tokio::time::timeout(
        settings.connect_timeout,
        tcp_connect(&target.host, target.port),
    )
    .await
    .map_err(|_| ConnectError::Timeout {
        stage: "tcp connect",
        after: settings.connect_timeout,
    })?
    .map_err(|e| ConnectError::tcp_connect_failed(&addr, &e))?;
    let connect_rtt = started.elapsed();
    let _ = tcp.set_nodelay(true);
    // Best effort: without it a new stream's open may queue behind
    // megabytes of other streams' data in the kernel (see UNSENT_LOWAT).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(UNSENT_LOWAT) {
        tracing::debug!(node = %target.node, %error, "cannot set TCP_NOTSENT_LOWAT");
    }
    let (stream, cut) = Severable::new(crate::read_buffer::ElasticReader::new(tcp));
    let result = establish(settings, target, stream, cut.clone()).await;
    if result.is_err() {
        // Whatever russh started for this transport ends now.
        cut.sever();
    }
    result.map(|session| Session {
        connect_rtt: Some(connect_rtt),
        ..session
    })
}

async fn establish(
    settings: Arc<SessionSettings>,
    target: Target,
    stream: Severable<crate::read_buffer::ElasticReader<TcpStream>>,
    cut: Arc<Severance>,
) -> Result<Session, ConnectError> {
    let rejection = Arc::new(Mutex::new(None));
    let ended = Arc::new(SessionEnd::default());
    let handler = ClientHandler {
        settings: settings.clone(),
        target: target.clone(),
        rejection: rejection.clone(),
        ended: ended.clone(),
    };
    let handshake = client::connect_stream(host_config(&settings, &target), stream, handler);
    let mut handle = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                stage: "ssh handshake",
                after: settings.handshake_timeout,
            })
        }
        Ok(Err(e)) => {
            if let Some(reason) = rejection.lock().ok().and_then(|mut r| r.take()) {
                return Err(ConnectError::HostKey(reason));
            }
            return Err(ConnectError::Protocol(e.to_string()));
        }
        Ok(Ok(handle)) => handle,
    };

    let identity = settings
        .identity
        .read()
        .map(|i| i.clone())
        .map_err(|_| ConnectError::Protocol("identity lock poisoned".into()))?;
    let certificate = settings.certificate.current();
    if let Some(certificate) = &certificate {
        // Checked again at each use: it may have expired since it was
        // loaded. Principals are the node's to judge (its
        // AuthorizedPrincipalsFile may map them to the login user).
        client_certificate::check(
            &certificate.certificate,
            &certificate.path,
            identity.public_key(),
            std::time::SystemTime::now(),
        )
        .map_err(|e| ConnectError::Certificate {
            reason: e.reason(),
            message: e.to_string(),
        })?;
    }
    let auth = async {
        if let Some(certificate) = &certificate {
            return handle
                .authenticate_openssh_cert(
                    target.user.clone(),
                    identity.key.clone(),
                    certificate.certificate.clone(),
                )
                .await;
        }
        let hash = if identity.key.algorithm().is_rsa() {
            handle.best_supported_rsa_hash().await?.flatten()
        } else {
            None
        };
        handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(identity.key.clone(), hash),
            )
            .await
    };
    match tokio::time::timeout(settings.auth_timeout, auth).await {
        Err(_) => Err(ConnectError::Timeout {
            stage: "authentication",
            after: settings.auth_timeout,
        }),
        Ok(Err(e)) => Err(ConnectError::Protocol(format!(
            "during authentication: {e}"
        ))),
        Ok(Ok(AuthResult::Success)) => Ok(Session {
            handle,
            ended,
            cut,
            connect_rtt: None,
        }),
        Ok(Ok(AuthResult::Failure {
            remaining_methods, ..
        })) => {
            let methods: Vec<String> = remaining_methods
                .iter()
                .map(|m| String::from(<&str>::from(m)))
                .collect();
            let methods = if methods.is_empty() {
                String::new()
            } else {
                format!(" (server accepts: {})", methods.join(", "))
            };
            Err(match certificate {
                Some(certificate) => ConnectError::CertificateRefused {
                    user: target.user.clone(),
                    key_id: certificate.key_id().to_string(),
                    serial: certificate.serial(),
                    principals: if certificate.principals().is_empty() {
                        "any".into()
                    } else {
                        certificate.principals().join(",")
                    },
                    methods,
                },
                None => ConnectError::Auth {
                    user: target.user.clone(),
                    fingerprint: identity.fingerprint(),
                    methods,
                },
            })
        }
    }
}

/// The russh configuration for one target: the shared one, with the host
/// key algorithms known_hosts lists for this host offered first (as
/// OpenSSH orders HostKeyAlgorithms), so the node presents a key we know.
fn host_config(settings: &SessionSettings, target: &Target) -> Arc<client::Config> {
    let Ok(known_hosts) = settings.known_hosts.read() else {
        return settings.russh.clone();
    };
    match config_for_host(&settings.russh, &known_hosts, &target.host, target.port) {
        Some(config) => Arc::new(config),
        None => settings.russh.clone(),
    }
}

/// `base` adjusted to what `known_hosts` says now about `host:port`: the
/// host key algorithms it lists for the host moved to the front (as
/// OpenSSH orders HostKeyAlgorithms), and host certificates asked for
/// exactly when it has an `@cert-authority` line (a line added by a reload
/// counts from the next connection). `None` when `base` is right as it is.
pub fn config_for_host(
    base: &client::Config,
    known_hosts: &KnownHosts,
    host: &str,
    port: u16,
) -> Option<client::Config> {
    let mut order = known_hosts.key_algorithms_for(host, port);
    let certificates = known_hosts.has_cert_authorities();
    let base_asks_certificates = !base.preferred.host_key_certificates.is_empty();
    if order.is_empty() && certificates == base_asks_certificates {
        return None;
    }
    for algorithm in base.preferred.key.iter() {
        if !order.contains(algorithm) {
            order.push(algorithm.clone());
        }
    }
    // russh's Config is not Clone: copy every field `russh_config` sets.
    let mut config = client::Config {
        window_size: base.window_size,
        limits: base.limits.clone(),
        maximum_packet_size: base.maximum_packet_size,
        nodelay: base.nodelay,
        adjust_window_on_consume: base.adjust_window_on_consume,
        keepalive_interval: base.keepalive_interval,
        inactivity_timeout: base.inactivity_timeout,
        peer_limits: base.peer_limits.clone(),
        preferred: base.preferred.clone(),
        ..client::Config::default()
    };
    config.preferred.key = Cow::Owned(order);
    config.preferred.host_key_certificates = if certificates {
        base.preferred.key.clone()
    } else {
        Cow::Borrowed(&[])
    };
    Some(config)
}

pub(crate) async fn tcp_connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolved to no address"),
        )
    }))
}

/// `host` with brackets if it is an IPv6 literal.
pub fn bracket(host: &str) -> Cow<'_, str> {
    if host.contains(':') {
        Cow::Owned(format!("[{host}]"))
    } else {
        Cow::Borrowed(host)
    }
}

/// A transport wrapper that can be cut from outside: once severed, every
/// read and write fails at once, which ends the russh session task (and so
/// every channel on it) even when the peer stopped answering.
pub struct Severable<S> {
    inner: S,
    cut: Arc<Severance>,
}

/// The switch of a [`Severable`] transport.
#[derive(Default)]
pub struct Severance {
    severed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Severance {
    /// Cut the transport.
    pub fn sever(&self) {
        self.severed.store(true, Ordering::Release);
        self.read.wake();
        self.write.wake();
    }

    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> Option<std::io::Error> {
        waker.register(cx.waker());
        self.severed
            .load(Ordering::Acquire)
            .then(|| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "session severed"))
    }
}

impl<S> Severable<S> {
    /// Wrap `inner`; keep the returned switch.
    pub fn new(inner: S) -> (Self, Arc<Severance>) {
        let cut = Arc::new(Severance::default());
        (
            Severable {
                inner,
                cut: cut.clone(),
            },
            cut,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Severable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut.check(&self.cut.read, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Severable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut.check(&self.cut.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut.check(&self.cut.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::key::safe_rng;
    use russh::keys::{Algorithm, PrivateKey};

    #[test]
    fn out_of_descriptors_is_a_local_failure_not_the_nodes_refusal() {
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let e = std::io::Error::from_raw_os_error(errno.raw_os_error());
            let error = ConnectError::tcp_connect_failed("10.0.0.1:22", &e);
            assert_eq!(error.reason(), "local_resources", "{error}");
            assert!(!error.is_unreachable(), "{error}");
            assert!(error.to_string().contains("LimitNOFILE"), "{error}");
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = ConnectError::tcp_connect_failed("10.0.0.1:22", &refused);
        assert_eq!(error.reason(), "refused");
        assert!(error.is_unreachable());
    }

    fn key_line(prefix: &str) -> String {
        key_line_of(prefix, Algorithm::Ed25519)
    }

    fn key_line_of(prefix: &str, algorithm: Algorithm) -> String {
        let key = PrivateKey::random(&mut safe_rng(), algorithm).expect("generate key");
        format!(
            "{prefix} {}\n",
            key.public_key().to_openssh().expect("encode key")
        )
    }

    #[test]
    fn a_cert_authority_added_after_start_asks_for_host_certificates() {
        // Started without any @cert-authority line: no certificates asked.
        let base = russh_config(&crate::ssh_config::SshConfig::default(), false);
        assert!(base.preferred.host_key_certificates.is_empty());
        // A reload brought one in: the next connection asks for them.
        let reloaded = KnownHosts::parse(&key_line("@cert-authority 10.240.*"), "known_hosts");
        let config = config_for_host(&base, &reloaded, "10.240.0.11", 22).expect("a new config");
        assert_eq!(
            config.preferred.host_key_certificates, base.preferred.key,
            "certificates for every key algorithm"
        );
        // And a reload that removed the last one stops asking.
        let with_ca = config;
        let plain = KnownHosts::parse(&key_line("10.240.0.11"), "known_hosts");
        let config = config_for_host(&with_ca, &plain, "10.240.0.11", 22).expect("a new config");
        assert!(config.preferred.host_key_certificates.is_empty());
    }

    #[test]
    fn known_host_key_algorithms_come_first_and_nothing_else_changes() {
        let base = russh_config(&crate::ssh_config::SshConfig::default(), false);
        let unrelated = KnownHosts::parse(&key_line("10.9.9.9"), "known_hosts");
        assert!(config_for_host(&base, &unrelated, "10.240.0.11", 22).is_none());
        let ecdsa = Algorithm::Ecdsa {
            curve: russh::keys::EcdsaCurve::NistP256,
        };
        assert_ne!(base.preferred.key.first(), Some(&ecdsa));
        let known = KnownHosts::parse(&key_line_of("10.240.0.11", ecdsa.clone()), "known_hosts");
        let config = config_for_host(&base, &known, "10.240.0.11", 22).expect("a new config");
        assert_eq!(config.preferred.key.first(), Some(&ecdsa));
        assert_eq!(config.preferred.key.len(), base.preferred.key.len());
        assert_eq!(config.window_size, base.window_size);
        assert!(config.adjust_window_on_consume);
        assert!(config.peer_limits.is_some(), "flood limits kept");
        assert!(config.preferred.host_key_certificates.is_empty());
    }
}
