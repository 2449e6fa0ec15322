//! The embedded metadata store: a revisioned key-value map kept in one file.
//!
//! Used when a node starts without `--kvdb`: a single-host cluster then needs nothing
//! else installed. Every change is written to a temporary file, fsynced and renamed
//! over the old one, so a crash leaves either the old or the new state, never a torn
//! one. The map is small (cluster, node and volume records), so rewriting it whole
//! costs less than a log would.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Claim, KeyValue};
use crate::error::{Error, Result};

/// Format version of the store file.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Default)]
struct State {
    v: u32,
    /// Last revision handed out; revisions grow across all keys, like etcd's.
    revision: i64,
    entries: BTreeMap<String, (String, i64)>,
}

/// A claimed key: its lease, value and when the lease runs out.
struct Claimed {
    lease: i64,
    value: String,
    ttl: Duration,
    until: Instant,
}

/// Claims live in memory only: the store serves one process, and a lease does not
/// outlive the process that renews it.
#[derive(Default)]
struct Claims {
    next_lease: i64,
    by_key: HashMap<String, Claimed>,
}

impl Claims {
    fn expire(&mut self, now: Instant) {
        self.by_key.retain(|_, c| now < c.until);
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct EmbeddedStore {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    claims: Arc<Mutex<Claims>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let state = match fs::read(path) {
            Ok(bytes) => {
                let st: State =
                    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptRecord {
                        key: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                if st.v > FORMAT_VERSION {
                    return Err(Error::CorruptRecord {
                        key: path.display().to_string(),
                        reason: format!(
                            "format version {} is newer than this node understands ({FORMAT_VERSION})",
                            st.v
                        ),
                    });
                }
                st
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                v: FORMAT_VERSION,
                ..State::default()
            },
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            state: Arc::new(Mutex::new(state)),
            claims: Arc::default(),
        })
    }

    fn persist(&self, st: &State) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(st).map_err(|e| Error::Internal(e.to_string()))?)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Applies `change` to a copy of the state and persists it; the in-memory state only
    /// moves once the file is durable.
    fn mutate<T>(&self, change: impl FnOnce(&mut State) -> Option<T>) -> Result<Option<T>> {
        let mut guard = self.state.lock().expect("embedded store lock poisoned");
        let mut next = State {
            v: FORMAT_VERSION,
            revision: guard.revision,
            entries: guard.entries.clone(),
        };
        let Some(out) = change(&mut next) else {
            return Ok(None);
        };
        self.persist(&next)?;
        *guard = next;
        Ok(Some(out))
    }

    pub fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let st = self.state.lock().expect("embedded store lock poisoned");
        if let Some((v, rev)) = st.entries.get(key) {
            return Ok(Some(KeyValue {
                key: key.to_string(),
                value: v.clone(),
                rev: *rev,
            }));
        }
        drop(st);
        // A claimed key reads like any other while its lease lasts (as in etcd).
        let mut cl = self.claims.lock().expect("claims");
        cl.expire(Instant::now());
        Ok(cl.by_key.get(key).map(|c| KeyValue {
            key: key.to_string(),
            value: c.value.clone(),
            rev: c.lease,
        }))
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let st = self.state.lock().expect("embedded store lock poisoned");
        Ok(st
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, rev))| KeyValue {
                key: k.clone(),
                value: v.clone(),
                rev: *rev,
            })
            .collect())
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.mutate(|st| {
            st.revision += 1;
            st.entries
                .insert(key.to_string(), (value.to_string(), st.revision));
            Some(())
        })?;
        Ok(())
    }

    pub fn put_if(&self, key: &str, value: &str, expected_rev: i64) -> Result<bool> {
        let done = self.mutate(|st| {
            let current = st.entries.get(key).map(|(_, r)| *r).unwrap_or(0);
            if current != expected_rev {
                return None;
            }
            st.revision += 1;
            st.entries
                .insert(key.to_string(), (value.to_string(), st.revision));
            Some(())
        })?;
        Ok(done.is_some())
    }

    pub fn delete_put_if(
        &self,
        key: &str,
        expected_rev: i64,
        put_key: &str,
        value: &str,
    ) -> Result<bool> {
        let done = self.mutate(|st| {
            match st.entries.get(key) {
                Some((_, r)) if *r == expected_rev => {}
                _ => return None,
            }
            st.revision += 1;
            st.entries.remove(key);
            st.entries
                .insert(put_key.to_string(), (value.to_string(), st.revision));
            Some(())
        })?;
        Ok(done.is_some())
    }

    pub fn delete_if(&self, key: &str, expected_rev: i64) -> Result<bool> {
        let done = self.mutate(|st| {
            match st.entries.get(key) {
                Some((_, r)) if *r == expected_rev => {}
                _ => return None,
            }
            st.revision += 1;
            st.entries.remove(key);
            Some(())
        })?;
        Ok(done.is_some())
    }

    pub fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut cl = self.claims.lock().expect("claims");
        cl.expire(now);
        if let Some(c) = cl.by_key.get(key) {
            return Ok(Claim::Taken(KeyValue {
                key: key.to_string(),
                value: c.value.clone(),
                rev: c.lease,
            }));
        }
        cl.next_lease += 1;
        let lease = cl.next_lease;
        cl.by_key.insert(
            key.to_string(),
            Claimed {
                lease,
                value: value.to_string(),
                ttl,
                until: now + ttl,
            },
        );
        Ok(Claim::Held { lease })
    }

    pub fn renew(&self, lease: i64) -> Result<bool> {
        let now = Instant::now();
        let mut cl = self.claims.lock().expect("claims");
        cl.expire(now);
        Ok(cl
            .by_key
            .values_mut()
            .find(|c| c.lease == lease)
            .map(|c| c.until = now + c.ttl)
            .is_some())
    }

    pub fn release(&self, lease: i64) -> Result<()> {
        let mut cl = self.claims.lock().expect("claims");
        cl.by_key.retain(|_, c| c.lease != lease);
        Ok(())
    }
}
