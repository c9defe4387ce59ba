//! The log span of one client connection: `connection{listener, peer,
//! dest, node, stream}`.
//!
//! Created at accept and entered by the connection's task (the task is
//! `instrument`ed with it), so every line logged while serving the
//! connection carries these fields without repeating them. `dest` is
//! recorded once the request is parsed, `node` once the dial routed it (or
//! its refusal names a node), `stream` once a channel is open.
//!
//! The span is at `error` level so that it is enabled whenever any line of
//! the connection is: a `warn` filter still shows whose line it is.

use tracing::field::{display, Empty};
use tracing::Span;

use super::ListenerKind;
use crate::dial::{Destination, DialError, TunnelIo};

/// A new root span for a connection of `listener` from `peer`.
pub(crate) fn new(listener: ListenerKind, peer: &str) -> Span {
    tracing::error_span!(
        parent: None,
        "connection",
        listener = listener.as_str(),
        peer = %peer,
        dest = Empty,
        node = Empty,
        stream = Empty,
    )
}

/// Record the parsed destination into the current connection span.
pub(crate) fn record_dest(dest: &Destination) {
    Span::current().record("dest", display(dest));
}

/// Record the node and stream id of an open tunnel.
pub(crate) fn record_tunnel(tunnel: &impl TunnelIo) {
    let (node, stream) = tunnel.log_context();
    let span = Span::current();
    if let Some(node) = node {
        span.record("node", node);
    }
    if let Some(stream) = stream {
        span.record("stream", stream);
    }
}

/// Record the node a refused dial names, if any.
pub(crate) fn record_refusal(error: &DialError) {
    if let Some(node) = super::error_node(error) {
        Span::current().record("node", node);
    }
}
