//! The process's file descriptor limit: at start the soft `RLIMIT_NOFILE`
//! is raised to the hard limit, since every SSH session and every client
//! connection holds a descriptor and the default soft limit (often 1024)
//! is far below what a few thousand nodes need.
//!
//! Running out anyway is classified as a local failure where it happens
//! ([`ConnectError::LocalResources`](crate::session::ConnectError::LocalResources)),
//! never as a node's refusal.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The soft and hard descriptor limits, before and after [`raise_soft_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and log what it is.
/// A refusal (a sandbox forbidding it) is logged and leaves the limit as
/// it was.
pub fn raise_soft_limit() -> Raised {
    let limit = getrlimit(Resource::Nofile);
    let mut raised = Raised {
        before: limit.current,
        now: limit.current,
        hard: limit.maximum,
    };
    if limit.current != limit.maximum {
        let wanted = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, wanted) {
            Ok(()) => raised.now = getrlimit(Resource::Nofile).current,
            Err(error) => tracing::warn!(
                soft = ?limit.current,
                hard = ?limit.maximum,
                %error,
                "cannot raise the soft file descriptor limit to the hard limit"
            ),
        }
    }
    tracing::info!(
        before = ?raised.before,
        soft = ?raised.now,
        hard = ?raised.hard,
        "file descriptor limit (each SSH session and client connection takes one; \
         raise it with systemd LimitNOFILE= or the container's nofile ulimit)"
    );
    raised
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        // Start below the hard limit (lowering the soft limit needs no
        // privilege; one below keeps the other tests' descriptors).
        let limit = getrlimit(Resource::Nofile);
        if let Some(hard) = limit.maximum {
            let lower = Rlimit {
                current: Some(hard - 1),
                maximum: Some(hard),
            };
            setrlimit(Resource::Nofile, lower).expect("lower the soft limit");
        }
        let raised = raise_soft_limit();
        if let Some(hard) = limit.maximum {
            assert_eq!(raised.before, Some(hard - 1), "{raised:?}");
        }
        assert_eq!(raised.now, raised.hard, "{raised:?}");
        assert_eq!(getrlimit(Resource::Nofile).current, raised.hard);
    }
}
