//! Every Redis key cronpipe uses, in one place. All keys of a namespace share
//! the hash tag `{ns}`, so they live in one Redis Cluster slot and the Lua
//! scripts that touch several of them stay valid on a cluster.

/// Key builder for one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Keys {
            prefix: format!("{{{namespace}}}"),
        }
    }

    /// The namespace's key prefix (`{ns}`), for clean-up by pattern.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// String: the leader lease, value `<token>:<instance>:<nonce>`.
    pub fn leader(&self) -> String {
        format!("{}:leader", self.prefix)
    }

    /// Counter: the last fencing token handed out.
    pub fn fencing(&self) -> String {
        format!("{}:leader:fencing", self.prefix)
    }

    /// Pub/sub channel: a leader released the lease.
    pub fn leader_released(&self) -> String {
        format!("{}:leader:released", self.prefix)
    }

    /// Hash: schedule name → last slot handled (epoch ms), advanced only after a broker confirm.
    pub fn watermarks(&self) -> String {
        format!("{}:watermarks", self.prefix)
    }

    /// Hash: schedule name → the timing its watermark was written under
    /// ([`crate::schedule::Schedule::timing_key`]), so a leader can tell a
    /// watermark of an older expression from one of the current.
    pub fn timings(&self) -> String {
        format!("{}:timings", self.prefix)
    }

    /// String: a task's idempotency state (`running:<worker>` with a lease, `done`, or `dead`).
    pub fn idem(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    /// Counter: claims of a task key, so crashes count as attempts.
    pub fn attempts(&self, key: &str) -> String {
        format!("{}:attempts:{key}", self.prefix)
    }

    /// Hash: schedule name → JSON definition, for schedules managed at runtime.
    pub fn dynamic_schedules(&self) -> String {
        format!("{}:schedules", self.prefix)
    }

    /// Set: names of paused schedules (from the config file or dynamic).
    pub fn paused(&self) -> String {
        format!("{}:schedules:paused", self.prefix)
    }

    /// Counter: bumped on every runtime schedule change; producers poll it.
    pub fn schedules_rev(&self) -> String {
        format!("{}:schedules:rev", self.prefix)
    }

    /// Stream: recent task executions (capped by length and age).
    pub fn history(&self) -> String {
        format!("{}:history", self.prefix)
    }

    /// String with TTL: held by the one `worker dlq replay` or `purge` running.
    pub fn dlq_lock(&self) -> String {
        format!("{}:dlq:lock", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_namespace_hash_tag() {
        let k = Keys::new("prod");
        for key in [
            k.leader(),
            k.fencing(),
            k.watermarks(),
            k.timings(),
            k.idem("a"),
            k.attempts("a"),
            k.dlq_lock(),
        ] {
            assert!(key.starts_with("{prod}:"), "{key}");
        }
        assert_ne!(k.idem("a"), k.attempts("a"));
    }
}
