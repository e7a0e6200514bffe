//! What one client may hold: open connections (in all and per client address), how long a
//! TLS handshake and a request's headers may take, and open watches per user. A slow or
//! flooding client is cut off without touching the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The limits, with defaults sized for a control plane serving agents and kubectl users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a TLS handshake may take from accept.
    pub handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers, idle time before them included.
    pub header_read_timeout: Duration,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one client address.
    pub max_connections_per_client: usize,
    /// Open watches of one user.
    pub max_watches_per_user: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_client: 512,
            max_watches_per_user: 2000,
        }
    }
}

/// Counts held by key, with a cap per key and an optional cap in all.
#[derive(Debug)]
struct Counter<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

impl<K: std::hash::Hash + Eq + Clone> Counter<K> {
    fn new() -> Self {
        Self {
            total: 0,
            by_key: HashMap::new(),
        }
    }

    fn try_take(&mut self, key: &K, per_key: usize, total: usize) -> Result<(), Refused> {
        let held = self.by_key.get(key).copied().unwrap_or(0);
        if self.total >= total {
            return Err(Refused::Total(total));
        }
        if held >= per_key {
            return Err(Refused::PerKey(per_key));
        }
        self.total += 1;
        self.by_key.insert(key.clone(), held + 1);
        Ok(())
    }

    fn give_back(&mut self, key: &K) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_key.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.by_key.remove(key);
            }
        }
    }
}

/// Why a connection or watch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The cap in all is reached.
    #[error("the server holds its maximum of {0}")]
    Total(usize),
    /// The caller's own cap is reached.
    #[error("the caller holds its maximum of {0}")]
    PerKey(usize),
}

/// Tracks open connections by client address and open watches by user.
#[derive(Debug)]
pub struct Limiter {
    limits: ConnectionLimits,
    connections: Mutex<Counter<IpAddr>>,
    watches: Mutex<Counter<String>>,
}

/// A held connection slot, given back on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Arc<Limiter>,
    addr: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limiter
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .give_back(&self.addr);
    }
}

/// A held watch slot, given back on drop (when the watch stream ends).
#[derive(Debug)]
pub struct WatchPermit {
    limiter: Arc<Limiter>,
    user: String,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.limiter
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .give_back(&self.user);
    }
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            connections: Mutex::new(Counter::new()),
            watches: Mutex::new(Counter::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Takes a connection slot for a client address.
    pub fn connection(self: &Arc<Self>, addr: IpAddr) -> Result<ConnectionPermit, Refused> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_take(
                &addr,
                self.limits.max_connections_per_client,
                self.limits.max_connections,
            )?;
        Ok(ConnectionPermit {
            limiter: self.clone(),
            addr,
        })
    }

    /// Takes a watch slot for a user.
    pub fn watch(self: &Arc<Self>, user: &str) -> Result<WatchPermit, Refused> {
        self.watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_take(
                &user.to_string(),
                self.limits.max_watches_per_user,
                usize::MAX,
            )?;
        Ok(WatchPermit {
            limiter: self.clone(),
            user: user.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_client_and_in_all_and_slots_come_back() {
        let l = Limiter::new(ConnectionLimits {
            max_connections: 3,
            max_connections_per_client: 2,
            max_watches_per_user: 1,
            ..ConnectionLimits::default()
        });
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = l.connection(a);
        let a2 = l.connection(a);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(l.connection(a).err(), Some(Refused::PerKey(2)));
        let b1 = l.connection(b);
        assert!(b1.is_ok());
        assert_eq!(l.connection(b).err(), Some(Refused::Total(3)));
        drop(a1);
        assert!(l.connection(b).is_ok());

        let w = l.watch("alice");
        assert!(w.is_ok());
        assert_eq!(l.watch("alice").err(), Some(Refused::PerKey(1)));
        assert!(l.watch("bob").is_ok());
        drop(w);
        assert!(l.watch("alice").is_ok());
    }
}
