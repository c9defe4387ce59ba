//! The `[routing]` table of the configuration ([`RoutingConfig`]) and its
//! validation.

use crate::field_error::FieldError;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::table::canonical_net;
#[cfg(doc)]
use super::{RouteError, Router};

/// The `[routing]` table of the configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Service CIDRs (ClusterIP ranges): reached through any Ready node.
    pub service_cidrs: Vec<IpNet>,
    /// What to do with a destination no other rule matches.
    pub default: DefaultRoute,
    /// Destination ports that may be reached; empty allows every port.
    pub allow_ports: Vec<u16>,
    /// CIDRs denied in addition to the built-in denials.
    pub deny_cidrs: Vec<IpNet>,
    /// Exceptions to the built-in denials and to `deny_cidrs`.
    pub allow_cidrs: Vec<IpNet>,
    /// The cluster's pod address ranges (kube-controller-manager's
    /// `--cluster-cidr`). When set, a node's pod CIDR outside all of them
    /// is ignored: a node cannot announce a pod CIDR over addresses that
    /// are not pods. Empty: any pod CIDR that passes the other checks.
    pub cluster_cidrs: Vec<IpNet>,
}

/// `routing.default`: the route of a destination no other rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultRoute {
    /// Refuse it ([`RouteError::NoRoute`]).
    #[default]
    Deny,
    /// Send it through any Ready node; DNS names are resolved by that node.
    AnyNode,
}

impl fmt::Display for DefaultRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultRoute::Deny => "deny",
            DefaultRoute::AnyNode => "any-node",
        })
    }
}

impl RoutingConfig {
    /// Check the table for mistakes a [`Router`] would otherwise silently
    /// accept.
    ///
    /// # Errors
    ///
    /// The offending key (e.g. `"allow_ports"`, relative to `[routing]`) and
    /// a one-line reason: port 0 in `allow_ports`, a CIDR with host bits set,
    /// or a CIDR in both `allow_cidrs` and `deny_cidrs`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.allow_ports.contains(&0) {
            return Err(FieldError::new(
                "allow_ports".to_owned(),
                "port 0 is not a valid destination port".to_owned(),
            ));
        }
        for (key, list) in [
            ("service_cidrs", &self.service_cidrs),
            ("deny_cidrs", &self.deny_cidrs),
            ("allow_cidrs", &self.allow_cidrs),
            ("cluster_cidrs", &self.cluster_cidrs),
        ] {
            if let Some(net) = list.iter().find(|net| net.trunc() != **net) {
                return Err(FieldError::new(
                    key.to_owned(),
                    format!("{net} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
        }
        for net in &self.allow_cidrs {
            let canonical = canonical_net(*net);
            if self
                .deny_cidrs
                .iter()
                .any(|deny| canonical_net(*deny) == canonical)
            {
                return Err(FieldError::new(
                    "allow_cidrs".to_owned(),
                    format!("{net} is also in deny_cidrs; keep it in one of the two lists"),
                ));
            }
        }
        Ok(())
    }
}
