//! `nodetunnel dev`: a throwaway cluster in one process, for a newcomer's
//! first five minutes. N in-process SSH nodes ([`node`]) serve a kubelet,
//! a pod and a service ([`services`]) reachable only through their SSH
//! sessions, and the real `serve` path (tunnel manager, router, front door,
//! admin API) runs against them.

pub mod node;
pub mod services;
