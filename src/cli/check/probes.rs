//! The network work of the steps before and after the host key: name
//! lookup, TCP connect, the SSH identification line, the key exchange
//! (recording the host key and algorithms), authentication and the
//! direct-tcpip channel to the kubelet; each failure with a hint.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::Channel;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::super::format;
use super::Target;
use super::{human, Checker, Failure};
use crate::session::bracket;

/// The hint of a failed name lookup.
const RESOLVE_HINT: &str = "check the name and the resolver of this host (/etc/resolv.conf), \
     or set the node's address (or ssh_address) to its IP";

/// The hint of packets dropped on the way to sshd.
const DROPPED_HINT: &str = "the packets are dropped: a firewall or security group, a wrong \
     address, or the node is down";

/// Longest SSH identification exchange read (RFC 4253 allows lines before
/// the identification; this bounds them).
const MAX_BANNER_BYTES: usize = 8192;

impl Checker {
    /// Step 1: the SSH host's addresses.
    pub(super) async fn resolve(
        &self,
        target: &Target,
    ) -> Result<(Vec<SocketAddr>, String), Failure> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            let addrs = vec![SocketAddr::new(ip, target.port)];
            return Ok((addrs, format!("{ip} (IP address, no lookup)")));
        }
        let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
        let found: Vec<SocketAddr> = match tokio::time::timeout(self.connect_timeout, lookup).await
        {
            Err(_) => {
                return Err(Failure::new(
                    format!(
                        "{} did not resolve within {}",
                        target.host,
                        human(self.connect_timeout)
                    ),
                    RESOLVE_HINT,
                ))
            }
            Ok(Err(e)) => return Err(Failure::new(format!("{}: {e}", target.host), RESOLVE_HINT)),
            Ok(Ok(found)) => found.collect(),
        };
        if found.is_empty() {
            return Err(Failure::new(
                format!("{} resolved to no address", target.host),
                RESOLVE_HINT,
            ));
        }
        let shown: Vec<String> = found.iter().take(4).map(|a| a.ip().to_string()).collect();
        Ok((found, shown.join(", ")))
    }

    /// Step 2: a TCP connection to the first address that answers.
    pub(super) async fn tcp_connect(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
    ) -> Result<(TcpStream, String), Failure> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut last: Option<(SocketAddr, std::io::Error)> = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok((tcp, addr.to_string()));
                }
                Ok(Err(e)) => last = Some((*addr, e)),
                Err(_) => break,
            }
        }
        Err(match last {
            Some((addr, e)) => connect_failure(addr, &e),
            None => Failure::new(
                format!(
                    "no answer from {}:{} within {}",
                    bracket(&target.host),
                    target.port,
                    human(self.connect_timeout)
                ),
                DROPPED_HINT,
            ),
        })
    }

    /// Step 3: the server's identification line; every byte read, to be
    /// replayed to the SSH client.
    pub(super) async fn banner(
        &self,
        tcp: &mut TcpStream,
        port: u16,
    ) -> Result<(Vec<u8>, String), Failure> {
        let read = tokio::time::timeout(self.handshake_timeout, read_banner(tcp)).await;
        let (banner, replay) = match read {
            Err(_) => {
                return Err(Failure::new(
                    format!(
                        "no SSH identification within {}",
                        human(self.handshake_timeout)
                    ),
                    format!(
                        "port {port} accepted the connection but said nothing: it is not sshd \
                         (another service, a TLS port), or sshd is overloaded (LoginGraceTime, \
                         MaxStartups)"
                    ),
                ))
            }
            Ok(Err(BannerError::Closed)) => {
                return Err(Failure::new(
                    "the server closed the connection before identifying itself",
                    "sshd dropped the connection at once: MaxStartups reached, TCP wrappers \
                     (/etc/hosts.deny), a per-source connection limit, or a proxy in the way; \
                     see the node's sshd log (journalctl -u ssh)",
                ))
            }
            Ok(Err(BannerError::Io(e))) => {
                return Err(Failure::new(format!("reading failed: {e}"), None))
            }
            Ok(Err(BannerError::NotSsh(line))) => {
                return Err(Failure::new(
                    format!(
                        "answered {:?}, not an SSH identification",
                        format::truncate(&line, 80)
                    ),
                    format!(
                        "something other than sshd listens on port {port}; check the port \
                         (ssh.port, nodes[].ssh_port)"
                    ),
                ))
            }
            Ok(Ok(found)) => found,
        };
        if banner.starts_with("SSH-1.") && !banner.starts_with("SSH-1.99-") {
            return Err(Failure::new(
                banner,
                "the server speaks only SSH protocol 1, which nodetunnel (like any current \
                 client) refuses",
            ));
        }
        Ok((replay, banner))
    }

    /// Step 4: the key exchange over the connection whose first bytes
    /// (`replay`) were already read. Any host key is accepted here and
    /// returned for step 5.
    pub(super) async fn key_exchange(
        &self,
        target: &Target,
        tcp: TcpStream,
        replay: Vec<u8>,
    ) -> Result<((Handle<Recorder>, Option<PublicKeyOrCertificate>), String), Failure> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let transport = Replay {
            prefix: replay,
            pos: 0,
            inner: tcp,
        };
        // Offer first the host key algorithms known_hosts has for this node,
        // exactly as `serve` does.
        let russh = crate::session::config_for_host(
            &self.russh,
            &self.known_hosts,
            &target.host,
            target.port,
        )
        .map(Arc::new)
        .unwrap_or_else(|| self.russh.clone());
        let kex = client::connect_stream(russh, transport, Recorder(seen.clone()));
        let session = match tokio::time::timeout(self.handshake_timeout, kex).await {
            Err(_) => {
                return Err(Failure::new(
                    format!("not finished within {}", human(self.handshake_timeout)),
                    "the node or the network is very slow, or a middlebox stalls the \
                     connection; raise ssh.handshake_timeout if the node is just slow",
                ))
            }
            Ok(Err(e)) => {
                let hint = match &e {
                    russh::Error::NoCommonAlgo { kind, .. } => format!(
                        "no {kind:?} algorithm in common: compare with \
                         `sshd -T | grep -Ei '^(kexalgorithms|ciphers|macs|hostkeyalgorithms)'` \
                         on the node; nodetunnel offers kex {}; ciphers {}; host keys {}",
                        offered(self.russh.preferred.kex.iter().map(|n| n.as_ref())),
                        offered(self.russh.preferred.cipher.iter().map(|n| n.as_ref())),
                        offered(self.russh.preferred.key.iter().map(|k| k.as_str())),
                    ),
                    _ => "see the node's sshd log (journalctl -u ssh) for why it ended the key \
                          exchange"
                        .to_string(),
                };
                return Err(Failure::new(e.to_string(), hint));
            }
            Ok(Ok(session)) => session,
        };
        let (key, algorithms) = match seen.lock() {
            Ok(mut s) => (s.key.take(), s.algorithms.take()),
            Err(_) => (None, None),
        };
        let detail = algorithms.unwrap_or_else(|| "completed".into());
        Ok(((session, key), detail))
    }

    /// Step 6: public-key authentication with the configured identity,
    /// or its certificate when `ssh.certificate` is set.
    pub(super) async fn authenticate(
        &self,
        session: &mut Handle<Recorder>,
        user: &str,
    ) -> Result<((), String), Failure> {
        if let Some(certificate) = self.certificate.clone() {
            return self
                .authenticate_certificate(session, user, &certificate)
                .await;
        }
        let key_text = format!(
            "{} {} ({})",
            self.identity.algorithm(),
            self.identity.fingerprint(),
            self.identity.path.display()
        );
        let identity = self.identity.clone();
        let auth = async {
            let hash = if identity.key.algorithm().is_rsa() {
                session.best_supported_rsa_hash().await?.flatten()
            } else {
                None
            };
            let key = PrivateKeyWithHashAlg::new(identity.key.clone(), hash);
            session.authenticate_publickey(user, key).await
        };
        let accepts = match self.run_auth(auth).await? {
            None => return Ok(((), format!("{user} with {key_text}"))),
            Some(accepts) => accepts,
        };
        let line = authorized_keys_line(self.identity.public_key());
        Err(Failure::new(
            format!("{user} with key {key_text} was refused{accepts}"),
            format!(
                "add the public key to ~{user}/.ssh/authorized_keys on the node:\n  {line}\n\
                 if it is there, the node's sshd log says why it was refused (permissions of \
                 ~/.ssh, AllowUsers, PermitRootLogin)"
            ),
        ))
    }

    /// Step 6 with `ssh.certificate`: checked locally first (expired, not
    /// yet valid, key), then offered (the node judges the principals).
    async fn authenticate_certificate(
        &self,
        session: &mut Handle<Recorder>,
        user: &str,
        certificate: &crate::client_certificate::ClientCertificate,
    ) -> Result<((), String), Failure> {
        let principals = if certificate.principals().is_empty() {
            "any".to_string()
        } else {
            certificate.principals().join(",")
        };
        let cert_text = format!(
            "certificate {:?} (serial {}, principals {principals}, {})",
            certificate.key_id(),
            certificate.serial(),
            certificate.path.display()
        );
        if let Err(e) = crate::client_certificate::check(
            &certificate.certificate,
            &certificate.path,
            self.identity.public_key(),
            std::time::SystemTime::now(),
        ) {
            return Err(Failure::new(
                format!("certificate not offered ({}): {e}", e.reason()),
                "replace ssh.certificate with a valid one (nodetunnel keys inspect shows it)",
            ));
        }
        let key = self.identity.key.clone();
        let cert = certificate.certificate.clone();
        let auth = session.authenticate_openssh_cert(user, key, cert);
        let accepts = match self.run_auth(auth).await? {
            None => return Ok(((), format!("{user} with {cert_text}"))),
            Some(accepts) => accepts,
        };
        let ca = crate::keys::fingerprint(&russh::keys::PublicKey::from(
            certificate.certificate.signature_key().clone(),
        ));
        Err(Failure::new(
            format!("{user} with {cert_text} was refused{accepts}"),
            format!(
                "the node's sshd decides: TrustedUserCAKeys must hold the CA key {ca}; with \
                 AuthorizedPrincipalsFile, the file for {user} must list one of the principals \
                 offered ({principals}), without it they must include {user}; RevokedKeys must \
                 not revoke it. The node's sshd log says which"
            ),
        ))
    }

    /// Run one authentication attempt within `auth_timeout`: `None` when
    /// it succeeded, else what the server accepts instead (" (server
    /// accepts: ...)" or empty).
    async fn run_auth(
        &self,
        auth: impl std::future::Future<Output = Result<AuthResult, russh::Error>>,
    ) -> Result<Option<String>, Failure> {
        let remaining = match tokio::time::timeout(self.auth_timeout, auth).await {
            Err(_) => {
                return Err(Failure::new(
                    format!("no answer within {}", human(self.auth_timeout)),
                    "sshd may be slow to look up the user (UseDNS, LDAP/NSS); see its log",
                ))
            }
            Ok(Err(e)) => return Err(Failure::new(format!("failed: {e}"), None)),
            Ok(Ok(AuthResult::Success)) => return Ok(None),
            Ok(Ok(AuthResult::Failure {
                remaining_methods, ..
            })) => remaining_methods,
        };
        let methods: Vec<String> = remaining
            .iter()
            .map(|m| String::from(<&str>::from(m)))
            .collect();
        Ok(Some(if methods.is_empty() {
            String::new()
        } else {
            format!(" (server accepts: {})", methods.join(", "))
        }))
    }

    /// The kubelet's host for `target` as seen from the node:
    /// `--kubelet-host`, else the node's preferred address.
    pub(super) fn kubelet_host<'a>(&'a self, target: &'a Target) -> &'a str {
        self.kubelet_host.as_deref().unwrap_or(&target.kubelet_host)
    }

    /// `host:port` of the kubelet for `target` as seen from the node.
    pub(super) fn kubelet(&self, target: &Target) -> String {
        format!(
            "{}:{}",
            bracket(self.kubelet_host(target)),
            self.kubelet_port
        )
    }

    /// Step 7: a direct-tcpip channel to the kubelet.
    pub(super) async fn open_kubelet(
        &self,
        session: &Handle<Recorder>,
        target: &Target,
    ) -> Result<(Channel<client::Msg>, String), Failure> {
        let kubelet = self.kubelet(target);
        let open = session.channel_open_direct_tcpip(
            self.kubelet_host(target).to_owned(),
            u32::from(self.kubelet_port),
            "127.0.0.1",
            0,
        );
        match tokio::time::timeout(self.channel_timeout, open).await {
            Err(_) => Err(Failure::new(
                format!(
                    "the node did not confirm a channel to {kubelet} within {}",
                    human(self.channel_timeout)
                ),
                "the connect from the node to the kubelet hangs: a firewall on the node drops it?",
            )),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                let apiserver_dials = match &self.kubelet_host {
                    None => "and kube-apiserver dials the same address".to_owned(),
                    Some(_) => format!(
                        "(--kubelet-host; kube-apiserver dials the node's preferred address, {})",
                        target.kubelet_host
                    ),
                };
                Err(open_failure(
                    &reason,
                    &kubelet,
                    self.kubelet_port,
                    &apiserver_dials,
                ))
            }
            Ok(Err(e)) => Err(Failure::new(format!("failed: {e}"), None)),
            Ok(Ok(channel)) => Ok((channel, format!("{kubelet} from the node"))),
        }
    }
}

/// The authorized_keys line for `key`: `type base64 comment`, the comment
/// being the key's own, or `nodetunnel` if it has none.
fn authorized_keys_line(key: &russh::keys::PublicKey) -> String {
    let Ok(text) = key.to_openssh() else {
        return "(cannot encode the public key)".into();
    };
    // `type base64`, then the comment if the key has one.
    if text.split_whitespace().nth(2).is_some() {
        text
    } else {
        format!("{text} nodetunnel")
    }
}

fn offered<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .filter(|n| !n.starts_with("ext-info") && !n.starts_with("kex-strict"))
        .collect::<Vec<_>>()
        .join(",")
}

fn connect_failure(addr: SocketAddr, e: &std::io::Error) -> Failure {
    use std::io::ErrorKind;
    let hint = match e.kind() {
        ErrorKind::ConnectionRefused => format!(
            "nothing listens on {addr}: is sshd running on the node, on this port \
             (ssh.port, nodes[].ssh_port)? A firewall may also reject it"
        ),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => format!(
            "no route from this host to {}: check the address and the routing between the \
             control plane and the nodes",
            addr.ip()
        ),
        ErrorKind::TimedOut => DROPPED_HINT.to_string(),
        _ => "check the address and that the node is up".to_string(),
    };
    Failure::new(format!("{addr}: {e}"), hint)
}

fn open_failure(
    reason: &russh::ChannelOpenFailure,
    kubelet: &str,
    port: u16,
    apiserver_dials: &str,
) -> Failure {
    match reason {
        russh::ChannelOpenFailure::AdministrativelyProhibited => Failure::new(
            format!("channel to {kubelet} administratively prohibited"),
            format!(
                "sshd forbids forwarding for this user: set AllowTcpForwarding yes (or local) \
                 and check DisableForwarding, PermitOpen, and authorized_keys options (restrict \
                 needs port-forwarding; permitopen must allow {kubelet})"
            ),
        ),
        russh::ChannelOpenFailure::ConnectFailed => Failure::new(
            format!("the node could not connect to {kubelet}"),
            format!(
                "nothing listens on {kubelet} as seen from the node {apiserver_dials}: is the \
                 kubelet running (systemctl status kubelet), and bound \
                 to this address (its --address)? To probe another address: --kubelet-host; \
                 another port: --kubelet-port (now {port})"
            ),
        ),
        russh::ChannelOpenFailure::ResourceShortage => Failure::new(
            format!("channel to {kubelet}: resource shortage"),
            "sshd refused another channel (MaxSessions?)",
        ),
        other => Failure::new(
            format!("channel to {kubelet} refused: {other:?}"),
            "see the node's sshd log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::authorized_keys_line;
    use russh::keys::ssh_key::Algorithm;
    use russh::keys::PrivateKey;

    #[test]
    fn the_authorized_keys_line_names_the_key_once() {
        let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key");
        let bare = authorized_keys_line(key.public_key());
        assert!(bare.starts_with("ssh-ed25519 AAAA"), "{bare}");
        assert!(bare.ends_with(" nodetunnel"), "{bare}");
        assert_eq!(bare.split_whitespace().count(), 3, "{bare}");
        key.set_comment("nodetunnel@cp-1");
        let named = authorized_keys_line(key.public_key());
        assert!(named.ends_with(" nodetunnel@cp-1"), "{named}");
        assert_eq!(named.split_whitespace().count(), 3, "{named}");
    }
}

#[derive(Debug, thiserror::Error)]
enum BannerError {
    #[error("closed")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("not ssh: {0}")]
    NotSsh(String),
}

/// Read up to and including the SSH identification line; the line
/// (printable characters only) and every byte read, for replay.
async fn read_banner(tcp: &mut TcpStream) -> Result<(String, Vec<u8>), BannerError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let mut line_start = 0;
    let mut first_line: Option<String> = None;
    loop {
        let n = tcp.read(&mut chunk).await.map_err(BannerError::Io)?;
        if n == 0 {
            return Err(match first_line {
                Some(line) => BannerError::NotSsh(line),
                None => BannerError::Closed,
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf[line_start..].iter().position(|b| *b == b'\n') {
            let line = &buf[line_start..line_start + end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text: String = String::from_utf8_lossy(line)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            if text.starts_with("SSH-") {
                return Ok((format::truncate(&text, 255), buf));
            }
            first_line.get_or_insert(text);
            line_start += end + 1;
        }
        if buf.len() > MAX_BANNER_BYTES {
            let line = first_line
                .unwrap_or_else(|| String::from_utf8_lossy(&buf[..80.min(buf.len())]).into_owned());
            return Err(BannerError::NotSsh(line));
        }
    }
}

/// A transport that first replays bytes already read from `inner`.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the key exchange showed.
#[derive(Default)]
struct Seen {
    key: Option<PublicKeyOrCertificate>,
    algorithms: Option<String>,
}

/// A russh handler that accepts any host key and records it and the
/// negotiated algorithms (the host key step judges the key before anything
/// is sent to the server).
pub(super) struct Recorder(Arc<Mutex<Seen>>);

impl client::Handler for Recorder {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let copy = match key {
            PublicKeyOrCertificate::PublicKey { key, hash_alg } => {
                PublicKeyOrCertificate::PublicKey {
                    key: key.clone(),
                    hash_alg: *hash_alg,
                }
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                PublicKeyOrCertificate::Certificate(cert.clone())
            }
        };
        if let Ok(mut seen) = self.0.lock() {
            seen.key = Some(copy);
        }
        Ok(true)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let mut text = format!(
            "kex {}, host key {}, cipher {}",
            names.kex.as_ref(),
            names.key.as_str(),
            names.cipher.as_ref()
        );
        if names.client_mac.as_ref() != "none" {
            let _ = write!(text, ", mac {}", names.client_mac.as_ref());
        }
        if let Ok(mut seen) = self.0.lock() {
            seen.algorithms.get_or_insert(text);
        }
        Ok(())
    }
}
