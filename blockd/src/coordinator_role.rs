//! Holding a shared volume's coordinator role: claiming it in the metadata store under
//! a lease, renewing it, and stepping down when it is lost.
//!
//! Order at a takeover: the volume record moves to this node at a new epoch, then the
//! role is claimed (waiting for the previous coordinator's lease to run out: its own
//! clock stopped it serving before), then the replicas are fenced and the namespace is
//! served behind the [`RoleGate`]. The renewing task opens the gate a TTL (less drift
//! and margin, see [`crate::role_lease`]) past each renewal it sent; a coordinator cut
//! off from the store therefore stops answering before a successor can start. When the
//! store reports the lease gone, or the volume record names another coordinator (this
//! node was declared dead while it could still reach the store), the node steps down:
//! it stops serving and releases the attachment if the record still names it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::meta::{Claim, MetaStore};
use crate::node::Node;
use crate::records::{self, VolumeRecord};
use crate::role_lease::{RoleGate, RoleLease};

/// How often a waiting successor asks for the role again.
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// The role held by an attachment: released when dropped (the attachment is torn down,
/// or the attach that claimed it was cancelled).
pub struct RoleHandle {
    pub gate: RoleGate,
    lease: i64,
    stop: Arc<AtomicBool>,
    meta: MetaStore,
}

impl Drop for RoleHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.gate.lock().expect("role gate").lose();
        let (meta, lease) = (self.meta.clone(), self.lease);
        // Best effort: unreleased, the lease runs out by itself.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = meta.release(lease).await {
                    warn!(error = %e, "cannot release a coordinator role lease; it runs out by itself");
                }
            });
        }
    }
}

impl Node {
    /// Claims the coordinator role of `rec` (which names this node at `rec.epoch`),
    /// waiting while a previous holder's lease lasts; starts renewing it.
    pub(crate) async fn claim_role(&self, rec: &VolumeRecord) -> Result<RoleHandle> {
        // With the embedded store this node is the whole cluster: no other node can take
        // a volume over, so the role never times out (a stalled runtime must not make a
        // node step down from its own volumes).
        let single = matches!(self.meta, MetaStore::Embedded(_));
        let ttl = if single {
            Duration::from_secs(u32::MAX as u64)
        } else {
            self.cfg.coordinator_lease
        };
        let key = self.keys.coordinator(&rec.id);
        let value = format!("{} epoch {}", self.id, rec.epoch);
        // A live holder that lost the record steps down within a renewal; a dead one's
        // lease runs out within a TTL. Past that, something else is wrong.
        let give_up = Instant::now() + ttl * 3 + Duration::from_secs(10);
        let mut waited = false;
        loop {
            let sent = Instant::now();
            match self.meta.claim(&key, &value, ttl).await? {
                Claim::Held { lease } => {
                    if waited {
                        info!(volume = %rec.name, "the previous coordinator's role lease ran out");
                    }
                    let stop = Arc::new(AtomicBool::new(false));
                    let gate: RoleGate = if single {
                        Arc::new(Mutex::new(RoleLease::unbounded()))
                    } else {
                        let gate = Arc::new(Mutex::new(RoleLease::granted(ttl, sent)));
                        tokio::spawn(keep_role(
                            self.me.clone(),
                            rec.clone(),
                            lease,
                            gate.clone(),
                            stop.clone(),
                        ));
                        gate
                    };
                    return Ok(RoleHandle {
                        gate,
                        lease,
                        stop,
                        meta: self.meta.clone(),
                    });
                }
                Claim::Taken(holder) => {
                    if Instant::now() > give_up {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {:?}: the coordinator role is still held ({}) after {:?}",
                            rec.name,
                            holder.value,
                            ttl * 3
                        )));
                    }
                    if !waited {
                        info!(volume = %rec.name, holder = %holder.value, ?ttl, "waiting for the previous coordinator's role lease to run out");
                        waited = true;
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                }
            }
        }
    }

    /// Whether the coordinator `rec` names has no role: its role key stays absent for a
    /// whole lease time while the record still names it at the same epoch (it could not
    /// renew: cut off from the store, not from gossip). Absent for a moment is normal
    /// right after an attach, before the claim.
    pub(crate) async fn role_abandoned(&self, rec: &VolumeRecord) -> Result<bool> {
        let key = self.keys.coordinator(&rec.id);
        if self.meta.get(&key).await?.is_some() {
            return Ok(false);
        }
        tokio::time::sleep(self.cfg.coordinator_lease).await;
        let now = self.meta.get(&self.keys.volume(&rec.id)).await?;
        let same = match now {
            Some(kv) => {
                let r: VolumeRecord = records::decode(&kv.key, &kv.value)?;
                r.attached_node == rec.attached_node && r.epoch == rec.epoch
            }
            None => false,
        };
        Ok(same && self.meta.get(&key).await?.is_none())
    }

    /// Steps down as the coordinator of a volume at `epoch`: stops serving it and, if
    /// the record still names this node at that epoch, clears the attachment so the
    /// next mount takes the volume over cleanly.
    async fn step_down(&self, volume_id: &str, epoch: u64) {
        let att = {
            let mut atts = self.attachments.lock().await;
            match atts.get(volume_id) {
                Some(a) if a.epoch == epoch => atts.remove(volume_id),
                _ => None,
            }
        };
        if let Some(att) = att {
            self.teardown(att).await;
        }
        let me = self.id.clone();
        let _ = self
            .update_volume(volume_id, |r| {
                if r.attached_node.as_deref() != Some(me.as_str()) || r.epoch != epoch {
                    return Err(Error::FailedPrecondition("taken over".into()));
                }
                r.clear_attachment();
                Ok(())
            })
            .await;
    }
}

/// Renews the role until stopped; steps down when it is lost.
async fn keep_role(
    node: Weak<Node>,
    rec: VolumeRecord,
    lease: i64,
    gate: RoleGate,
    stop: Arc<AtomicBool>,
) {
    let every = gate.lock().expect("role gate").renew_every();
    let mut unreachable = false;
    let lost = loop {
        tokio::time::sleep(every).await;
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let sent = Instant::now();
        // Each call is bounded by the renewal interval: one hung call must not stretch
        // the time between renewals past the TTL.
        let renewed = tokio::time::timeout(every, node.meta.renew(lease))
            .await
            .unwrap_or_else(|_| Err(Error::MetaUnavailable("renewal timed out".into())));
        match renewed {
            Ok(true) => gate.lock().expect("role gate").renewed(sent),
            Ok(false) => break "the metadata store dropped the role lease",
            Err(e) => {
                // The gate closes by itself when this lasts; a renewal later reopens it.
                if !unreachable {
                    warn!(volume = %rec.name, error = %e, "cannot renew the coordinator role lease");
                    unreachable = true;
                }
                continue;
            }
        }
        if unreachable {
            info!(volume = %rec.name, "coordinator role lease renewed again");
            unreachable = false;
        }
        // Declared dead by the others while the store was still reachable: a successor
        // has the record and waits for this lease.
        let record = tokio::time::timeout(every, node.meta.get(&node.keys.volume(&rec.id)))
            .await
            .unwrap_or_else(|_| Err(Error::MetaUnavailable("read timed out".into())));
        match record {
            Ok(Some(kv)) => match records::decode::<VolumeRecord>(&kv.key, &kv.value) {
                Ok(r)
                    if r.attached_node.as_deref() == Some(node.id.as_str())
                        && r.epoch == rec.epoch => {}
                Ok(_) => break "another node took the volume over",
                Err(_) => {}
            },
            Ok(None) => break "the volume record is gone",
            Err(_) => {}
        }
    };
    if stop.load(Ordering::SeqCst) {
        return;
    }
    gate.lock().expect("role gate").lose();
    warn!(volume = %rec.name, epoch = rec.epoch, reason = lost, "stepping down as the volume's coordinator");
    if let Some(node) = node.upgrade() {
        node.step_down(&rec.id, rec.epoch).await;
    }
}
