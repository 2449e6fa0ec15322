//! Cluster metadata store: one interface, two implementations.
//!
//! [`MetaStore`] is what every part of the node uses to read and change cluster
//! metadata. It is backed either by etcd (several hosts) or by an embedded store kept
//! in the node's data dir (a single host with nothing else installed). Both give the
//! same semantics: every key carries a modification revision, and conditional writes
//! compare it, so read-modify-write cycles are safe under concurrency. The conformance
//! suite in `tests/meta_conformance.rs` runs against both.
//!
//! etcd is never on the I/O path: it is touched when membership, placement, attach
//! state or a volume record changes.

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdAuth, EtcdStore};

use std::time::Duration;

use crate::error::Result;

/// One key with its value and modification revision (never 0 for a present key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub rev: i64,
}

/// The outcome of [`MetaStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours while lease `lease` is renewed.
    Held { lease: i64 },
    /// Another holder has it (its value; rev 0 when it vanished meanwhile).
    Taken(KeyValue),
}

/// The cluster metadata store.
#[derive(Clone)]
pub enum MetaStore {
    Etcd(Box<EtcdStore>),
    Embedded(EmbeddedStore),
}

impl MetaStore {
    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self {
            MetaStore::Etcd(s) => s.get(key).await,
            MetaStore::Embedded(s) => s.get(key),
        }
    }

    /// Reads every key that starts with `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        match self {
            MetaStore::Etcd(s) => s.list(prefix).await,
            MetaStore::Embedded(s) => s.list(prefix),
        }
    }

    /// Writes `value` only if the key's revision is `expected_rev` (0: the key must be
    /// absent). Returns false, changing nothing, when the revision differs.
    pub async fn put_if(&self, key: &str, value: &str, expected_rev: i64) -> Result<bool> {
        match self {
            MetaStore::Etcd(s) => s.put_if(key, value, expected_rev).await,
            MetaStore::Embedded(s) => s.put_if(key, value, expected_rev),
        }
    }

    /// Writes `value` unconditionally.
    pub async fn put(&self, key: &str, value: &str) -> Result<()> {
        match self {
            MetaStore::Etcd(s) => s.put(key, value).await,
            MetaStore::Embedded(s) => s.put(key, value),
        }
    }

    /// Deletes the key only if its revision is `expected_rev`. Returns false, changing
    /// nothing, when the revision differs or the key is absent.
    pub async fn delete_if(&self, key: &str, expected_rev: i64) -> Result<bool> {
        match self {
            MetaStore::Etcd(s) => s.delete_if(key, expected_rev).await,
            MetaStore::Embedded(s) => s.delete_if(key, expected_rev),
        }
    }

    /// Deletes `key` (only if its revision is `expected_rev`) and writes `put_key` in
    /// one transaction: both happen or neither. Returns false when the revision differs.
    pub async fn delete_put_if(
        &self,
        key: &str,
        expected_rev: i64,
        put_key: &str,
        value: &str,
    ) -> Result<bool> {
        match self {
            MetaStore::Etcd(s) => s.delete_put_if(key, expected_rev, put_key, value).await,
            MetaStore::Embedded(s) => s.delete_put_if(key, expected_rev, put_key, value),
        }
    }

    /// Claims `key` (writes `value` if it is absent) under a new lease that the store
    /// drops `ttl` after its last renewal, deleting the key with it.
    pub async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim> {
        match self {
            MetaStore::Etcd(s) => s.claim(key, value, ttl).await,
            MetaStore::Embedded(s) => s.claim(key, value, ttl),
        }
    }

    /// Renews a lease from [`Self::claim`]; false when the store no longer has it
    /// (expired or released), so the claimed key is gone.
    pub async fn renew(&self, lease: i64) -> Result<bool> {
        match self {
            MetaStore::Etcd(s) => s.renew(lease).await,
            MetaStore::Embedded(s) => s.renew(lease),
        }
    }

    /// Ends a lease from [`Self::claim`] now, deleting its key.
    pub async fn release(&self, lease: i64) -> Result<()> {
        match self {
            MetaStore::Etcd(s) => s.release(lease).await,
            MetaStore::Embedded(s) => s.release(lease),
        }
    }

    /// A short name for logs and `status`.
    pub fn kind(&self) -> &'static str {
        match self {
            MetaStore::Etcd(_) => "etcd",
            MetaStore::Embedded(_) => "embedded",
        }
    }
}
