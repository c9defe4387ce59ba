//! nodetunnel (work in progress)
#![forbid(unsafe_code)]
pub mod dial;
pub mod metrics;
pub mod shutdown;
pub mod splice;
