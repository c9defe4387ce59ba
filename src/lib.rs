//! nodetunnel: SSH tunnels from the Kubernetes control plane to every node.
//!
//! kube-apiserver sends its `cluster` egress (kubelet logs/exec/port-forward,
//! proxy to nodes, pods and services) to nodetunnel's front door over HTTP
//! CONNECT or SOCKS5. The router picks a node for each destination, and the
//! connection travels as a direct-tcpip channel over an SSH session that the
//! tunnel manager keeps open to that node's sshd. Nothing runs on the nodes
//! but sshd.
//!
//! ```text
//! kube-apiserver --CONNECT--> proxy --> router --> manager --> tunnel(node) ==SSH==> sshd --> kubelet/pod/service
//! ```
//!
//! # Layout
//!
//! The ground floor, shared types that import nothing above them:
//!
//! - [`destination`]: a destination host and port, parsed and canonical
//!   once, for every layer after the front door.
//! - [`node`]: a node's description; [`ssh_config`]: the `[ssh]` table;
//!   [`tunnel_status`]: a tunnel's state and status.
//!
//! Each feature module owns its own config table; [`config`] assembles the
//! file from them and validates it, and no module below imports it back.
//! No import circle between modules (apart from a parent and its own
//! children): `tools/module_cycles.py` checks it in CI.
//!
//! - [`config`]: the TOML file, defaults and validation.
//! - [`keys`]: the client identity (load, generate); [`known_hosts`]: host
//!   key trust (OpenSSH known_hosts, hashed names, wildcards, CAs, revocation).
//! - [`client_certificate`]: the OpenSSH user certificate sessions offer
//!   (`ssh.certificate`); [`issuer`]: signing and renewing nodetunnel's own
//!   (`[ssh.issuer]`).
//! - [`session`]: connecting one SSH session (timeouts, host key check, auth);
//!   [`read_buffer`]: its socket read buffer, grown under load.
//! - [`keepalive`]: session liveness; [`backoff`]: reconnect delays.
//! - [`tunnel`]: one node's sessions and their state machine.
//! - [`manager`]: all tunnels, runtime changes, and the [`dial::Dialer`]
//!   the front door uses.
//! - [`stream`]: a multiplexed stream with head-of-line isolation;
//!   [`splice`]: the copy loop with half-close.
//! - [`router`]: destination to node, and the destination policy.
//! - [`proxy`]: the front door (HTTP CONNECT over UDS or TCP+mTLS, SOCKS5).
//! - [`metrics`], [`logging`], [`shutdown`], [`socket_file`], [`descriptors`]: process plumbing.
//! - [`inventory`]: where nodes come from; [`admin`]: the admin API.
//! - [`audit`]: the audit trail (`[audit]`): one record per tunnelled
//!   connection and per refusal.
//! - [`dev`]: `nodetunnel dev`, an in-process cluster for trying it out.
//! - [`cli`] and [`serve`]: the binary's commands.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod backoff;
pub mod cli;
pub mod client_certificate;
pub mod config;
pub mod descriptors;
pub mod destination;
pub mod dev;
pub mod dial;
pub mod field_error;
pub mod inventory;
pub mod issuer;
pub mod keepalive;
pub mod keys;
pub mod known_hosts;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod read_buffer;
pub mod reconnect;
pub mod router;
pub mod serve;
pub mod session;
pub mod shutdown;
pub mod socket_file;
pub mod splice;
pub mod ssh_config;
pub mod stream;
pub mod tunnel;
pub mod tunnel_status;
