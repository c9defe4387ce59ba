//! One dev node: an in-process SSH server (russh) on a loopback port that
//! accepts the dev client key and answers direct-tcpip for the node's
//! virtual addresses with the services of [`super::services`].

use super::DevError;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::services::{self, Service};
use crate::session::{Severable, Severance};

/// The kubelet port.
pub const KUBELET_PORT: u16 = 10250;
/// The port of the dev pods and the dev service.
pub const HTTP_PORT: u16 = 80;
/// The dev cluster's service IP, answered by every node.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Addresses of dev node `index` (1-based).
#[derive(Clone, Debug)]
pub struct DevNodeSpec {
    /// `node-<index>`.
    pub name: String,
    /// Its (virtual) node IP, 10.240.0.(10 + index).
    pub ip: Ipv4Addr,
    /// Its pod CIDR, 10.244.<index>.0/24.
    pub pod_cidr: Ipv4Net,
    /// Its one pod's IP, 10.244.<index>.10.
    pub pod_ip: Ipv4Addr,
}

impl DevNodeSpec {
    /// The spec of node `index` (1 to 200).
    pub fn new(index: u8) -> DevNodeSpec {
        DevNodeSpec {
            name: format!("node-{index}"),
            ip: Ipv4Addr::new(10, 240, 0, 10u8.saturating_add(index)),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, index, 0), 24)
                .unwrap_or_else(|_| Ipv4Net::default()),
            pod_ip: Ipv4Addr::new(10, 244, index, 10),
        }
    }

    /// The pod's name.
    pub fn pod_name(&self) -> String {
        format!("web-{}", self.name)
    }

    /// Which service `host:port`, as the node sees it, reaches.
    pub fn service_for(&self, host: &str, port: u16) -> Option<Service> {
        let ip: Option<Ipv4Addr> = host.parse().ok();
        // The kubelet listens on every address of its node, loopback too.
        let is_node = ip == Some(self.ip)
            || ip.is_some_and(|ip| ip.is_loopback())
            || host == self.name
            || host == "localhost";
        match port {
            KUBELET_PORT if is_node => Some(Service::Kubelet),
            HTTP_PORT if ip == Some(self.pod_ip) => Some(Service::Pod {
                name: self.pod_name(),
            }),
            HTTP_PORT if ip == Some(SERVICE_IP) => Some(Service::ClusterService),
            _ => None,
        }
    }
}

/// A running (or stopped) dev node.
pub struct DevNode {
    spec: DevNodeSpec,
    addr: SocketAddr,
    host_key: PrivateKey,
    client: PublicKey,
    tls: Arc<rustls::ServerConfig>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<Arc<Severance>>>>,
}

impl DevNode {
    /// Start node `spec` on 127.0.0.1 (ephemeral port), trusting `client`.
    pub async fn start(spec: DevNodeSpec, client: PublicKey) -> Result<DevNode, DevError> {
        let host_key =
            PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(DevError::HostKey)?;
        let tls = services::kubelet_tls(&spec.name, &spec.ip.to_string())?;
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let bind = |source| DevError::Bind { addr: any, source };
        let listener = TcpListener::bind(any).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let mut node = DevNode {
            spec,
            addr,
            host_key,
            client,
            tls,
            accept: None,
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        node.serve(listener);
        Ok(node)
    }

    /// The node's spec.
    pub fn spec(&self) -> &DevNodeSpec {
        &self.spec
    }

    /// Where its sshd listens.
    pub fn ssh_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its host key, as a known_hosts line.
    pub fn known_hosts_line(&self) -> Result<String, DevError> {
        let key = self
            .host_key
            .public_key()
            .to_openssh()
            .map_err(DevError::HostKey)?;
        Ok(format!("[{}]:{} {key}", self.addr.ip(), self.addr.port()))
    }

    /// Whether it is up.
    pub fn is_running(&self) -> bool {
        self.accept.is_some()
    }

    /// Take the node down: stop listening and cut every session, as if the
    /// machine died.
    pub async fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        let cut: Vec<_> = self
            .connections
            .lock()
            .map(|mut c| c.drain(..).collect())
            .unwrap_or_default();
        for connection in cut {
            connection.sever();
        }
    }

    /// Bring the node back on the same port.
    pub async fn restart(&mut self) -> Result<(), DevError> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| DevError::Bind {
                addr: self.addr,
                source,
            })?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&mut self, listener: TcpListener) {
        let config = Arc::new(server::Config {
            keys: vec![self.host_key.clone()],
            auth_rejection_time: std::time::Duration::from_millis(10),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            nodelay: true,
            ..Default::default()
        });
        let handler = NodeHandler {
            spec: Arc::new(self.spec.clone()),
            node: Arc::from(self.spec.name.as_str()),
            client: self.client.clone(),
            tls: self.tls.clone(),
        };
        let connections = self.connections.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let _ = socket.set_nodelay(true);
                let (socket, cut) = Severable::new(socket);
                if let Ok(mut c) = connections.lock() {
                    // Forget sessions that ended (only this list holds their switch).
                    c.retain(|s| Arc::strong_count(s) > 1);
                    c.push(cut);
                }
                let config = config.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, socket, handler).await {
                        let _ = session.await;
                    }
                });
            }
        }));
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        if let Ok(mut c) = self.connections.lock() {
            for connection in c.drain(..) {
                connection.sever();
            }
        }
    }
}

#[derive(Clone)]
struct NodeHandler {
    spec: Arc<DevNodeSpec>,
    node: Arc<str>,
    client: PublicKey,
    tls: Arc<rustls::ServerConfig>,
}

impl server::Handler for NodeHandler {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if key.public_key.key_data() == self.client.key_data() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let service = u16::try_from(port_to_connect)
            .ok()
            .and_then(|port| self.spec.service_for(host_to_connect, port));
        match service {
            None => {
                tracing::debug!(node = %self.node, host = host_to_connect, port = port_to_connect, "dev node: nothing listens there");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
            Some(service) => {
                reply.accept().await;
                let node = self.node.clone();
                let tls = self.tls.clone();
                tokio::spawn(services::serve(service, node, tls, channel.into_stream()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_map_to_the_node_services() {
        let spec = DevNodeSpec::new(2);
        assert_eq!(spec.ip, Ipv4Addr::new(10, 240, 0, 12));
        assert_eq!(
            spec.service_for("10.240.0.12", 10250),
            Some(Service::Kubelet)
        );
        assert_eq!(spec.service_for("node-2", 10250), Some(Service::Kubelet));
        assert_eq!(spec.service_for("127.0.0.1", 10250), Some(Service::Kubelet));
        assert_eq!(
            spec.service_for("10.244.2.10", 80),
            Some(Service::Pod {
                name: "web-node-2".into()
            })
        );
        assert_eq!(
            spec.service_for("10.96.0.10", 80),
            Some(Service::ClusterService)
        );
        assert_eq!(
            spec.service_for("10.240.0.11", 10250),
            None,
            "another node's kubelet"
        );
        assert_eq!(spec.service_for("10.244.2.10", 81), None);
    }
}
