//! A real OpenSSH sshd on 127.0.0.1 with a throwaway host key, and client keys.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::procs;
use super::READY_TIMEOUT;

/// Where the tests expect Debian's openssh-server.
pub const SSHD_PATH: &str = "/usr/sbin/sshd";

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_loopback_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Options for [`Sshd::start`].
#[derive(Clone, Debug)]
pub struct SshdOptions {
    /// Public key lines authorized from the start.
    pub authorized_keys: Vec<String>,
    /// Extra sshd_config lines. They are written before the defaults, so they
    /// override them (sshd uses the first value it reads for a keyword).
    pub extra_config: Vec<String>,
    /// Fixed port; default: a free port.
    pub port: Option<u16>,
    /// The sshd binary (default [`SSHD_PATH`]).
    pub sshd_path: PathBuf,
}

impl Default for SshdOptions {
    fn default() -> Self {
        SshdOptions {
            authorized_keys: Vec::new(),
            extra_config: Vec::new(),
            port: None,
            sshd_path: PathBuf::from(SSHD_PATH),
        }
    }
}

/// A running `sshd -D` on 127.0.0.1:port. Killed (with all its session
/// processes) on Drop; its temp dir is removed.
pub struct Sshd {
    dir: tempfile::TempDir,
    sshd_path: PathBuf,
    config: PathBuf,
    log: PathBuf,
    authorized_keys: PathBuf,
    known_hosts: PathBuf,
    port: u16,
    host_key: String,
    child: Option<Child>,
}

impl Sshd {
    /// Generate a host key, write the config, start sshd and wait until it
    /// answers with an SSH banner.
    pub fn start(opts: SshdOptions) -> Result<Sshd> {
        super::require_sshd(&opts.sshd_path)?;
        ensure_privsep_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("nt-sshd-")
            .tempdir()
            .context("creating sshd temp dir")?;
        let host_key_path = dir.path().join("ssh_host_ed25519_key");
        keygen(&host_key_path, "nodetunnel-test-host")?;
        let host_key = public_line_of(&host_key_path.with_extension("pub"))?;

        let mut sshd = Sshd {
            config: dir.path().join("sshd_config"),
            log: dir.path().join("sshd.log"),
            authorized_keys: dir.path().join("authorized_keys"),
            known_hosts: dir.path().join("known_hosts"),
            sshd_path: opts.sshd_path.clone(),
            port: 0,
            host_key,
            child: None,
            dir,
        };
        sshd.write_authorized_keys(&opts.authorized_keys)?;

        // A free port can be taken by someone else before sshd binds it:
        // retry with another one (only when the port was not fixed).
        let attempts = if opts.port.is_some() { 1 } else { 5 };
        let mut last_err = None;
        for _ in 0..attempts {
            let port = match opts.port {
                Some(p) => p,
                None => free_loopback_port()?,
            };
            sshd.port = port;
            sshd.write_config(&host_key_path, &opts.extra_config)?;
            fs::write(&sshd.known_hosts, format!("{}\n", sshd.known_hosts_line()))?;
            match sshd.spawn_and_wait() {
                Ok(()) => return Ok(sshd),
                Err(e) => {
                    let log = sshd.log();
                    sshd.kill();
                    let bind_race = log.contains("Address already in use")
                        || log.contains("Cannot bind any address");
                    last_err = Some(e);
                    if !bind_race {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap())
    }

    fn write_config(&self, host_key: &Path, extra: &[String]) -> Result<()> {
        let d = self.dir.path().display();
        let mut cfg = String::new();
        for line in extra {
            cfg.push_str(line);
            cfg.push('\n');
        }
        cfg.push_str(&format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             AddressFamily inet\n\
             HostKey {hk}\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {ak}\n\
             UsePAM no\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\n\
             X11Forwarding no\n\
             PermitTunnel no\n\
             UseDNS no\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n\
             MaxStartups 100:30:200\n\
             MaxSessions 1000\n\
             MaxAuthTries 6\n\
             LoginGraceTime 30\n",
            port = self.port,
            hk = host_key.display(),
            ak = self.authorized_keys.display(),
        ));
        fs::write(&self.config, cfg).with_context(|| format!("writing {}", self.config.display()))
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.sshd_path)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.sshd_path.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = self.addr();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "sshd exited ({status}) before accepting connections on {addr}; log:\n{}",
                    self.log()
                );
            }
            if ssh_banner(addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sshd did not answer on {addr} within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            procs::kill_tree(child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The listening port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `ssh-ed25519 AAAA...` (no comment).
    pub fn host_key_public_line(&self) -> &str {
        &self.host_key
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...`
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key)
    }

    /// A known_hosts file holding [`Sshd::known_hosts_line`].
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// The login user: the current user (root in CI).
    pub fn user() -> String {
        current_user()
    }

    /// The temp dir holding config, keys and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything sshd logged so far (LogLevel VERBOSE).
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Add a public key line to authorized_keys (takes effect for the next
    /// authentication; the file is replaced atomically).
    pub fn authorize(&self, pubkey_line: &str) -> Result<()> {
        let mut keys: Vec<String> = fs::read_to_string(&self.authorized_keys)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        keys.push(pubkey_line.trim().to_owned());
        self.write_authorized_keys(&keys)
    }

    /// Empty authorized_keys: every later authentication fails.
    pub fn unauthorize_all(&self) -> Result<()> {
        self.write_authorized_keys(&[])
    }

    fn write_authorized_keys(&self, keys: &[String]) -> Result<()> {
        let mut text = String::new();
        for k in keys {
            text.push_str(k.trim());
            text.push('\n');
        }
        write_atomic(&self.authorized_keys, text.as_bytes())
    }

    /// Whether the sshd listener is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// kill -9 the listener and all its children (established sessions die
    /// too). The port then refuses connections.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Start again on the same port with the same host key and config.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn_and_wait()
            .with_context(|| format!("restarting sshd on port {}", self.port))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- sshd log ({}), test failed ---\n{}--- end of sshd log ---",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Connect and read the server's identification line (`SSH-2.0-...`).
pub fn ssh_banner(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("reading SSH banner from {addr}"))?;
    if !line.starts_with("SSH-2.0-") {
        bail!("{addr} answered {line:?}, not an SSH banner");
    }
    Ok(line.trim_end().to_owned())
}

/// An ed25519 client key pair on disk.
#[derive(Clone, Debug)]
pub struct ClientKey {
    /// OpenSSH private key file, mode 0600.
    pub private_path: PathBuf,
    /// `ssh-ed25519 AAAA... nodetunnel-test`
    pub public_line: String,
}

impl ClientKey {
    /// Generate a key with russh's key code and write `DIR/id_ed25519` (0600)
    /// and `DIR/id_ed25519.pub`.
    pub fn generate(dir: &Path) -> Result<ClientKey> {
        Self::generate_named(dir, "id_ed25519")
    }

    /// Like [`ClientKey::generate`] with a chosen file name.
    pub fn generate_named(dir: &Path, name: &str) -> Result<ClientKey> {
        use russh::keys::ssh_key::private::Ed25519Keypair;
        use russh::keys::ssh_key::LineEnding;
        use russh::keys::PrivateKey;

        let mut seed = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .context("reading /dev/urandom")?;
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment("nodetunnel-test");
        let private_pem = key
            .to_openssh(LineEnding::LF)
            .context("encoding private key")?;
        let public_line = key
            .public_key()
            .to_openssh()
            .context("encoding public key")?;

        let private_path = dir.join(name);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&private_path)
            .with_context(|| format!("creating {}", private_path.display()))?;
        f.write_all(private_pem.as_bytes())?;
        fs::set_permissions(&private_path, fs::Permissions::from_mode(0o600))?;
        fs::write(dir.join(format!("{name}.pub")), format!("{public_line}\n"))?;
        Ok(ClientKey {
            private_path,
            public_line,
        })
    }

    /// Load the private key with russh.
    pub fn load(&self) -> Result<russh::keys::PrivateKey> {
        russh::keys::load_secret_key(&self.private_path, None)
            .with_context(|| format!("loading {}", self.private_path.display()))
    }
}

/// The name of the current (effective) user.
pub fn current_user() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// sshd refuses to start without its privilege separation directory.
fn ensure_privsep_dir() -> Result<()> {
    let dir = Path::new("/run/sshd");
    if !dir.is_dir() {
        fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating sshd's privilege separation dir {} (run as root)",
                dir.display()
            )
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// `ssh-keygen -t ed25519 -N '' -f PATH`.
pub(crate) fn keygen(path: &Path, comment: &str) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (apt-get install openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -f {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The `type base64` part of a .pub file.
fn public_line_of(pub_path: &Path) -> Result<String> {
    let text =
        fs::read_to_string(pub_path).with_context(|| format!("reading {}", pub_path.display()))?;
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(t), Some(b)) => Ok(format!("{t} {b}")),
        _ => bail!("{} is not a public key file: {text:?}", pub_path.display()),
    }
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
