//! A new coordinator's open of its volume: every in-sync replica is fenced at the new
//! epoch; those that cannot count in sync any more (files gone, silent, or their host
//! rebooted since their last sync) leave the in-sync set; the rest are made equal
//! (reconcile) and durable before anything is served.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use shoal_proto::block::OpenRequest;
use tracing::warn;

use super::{VolumeIo, MISSING};
use crate::error::{Error, Result};
use crate::pool::OpenState;
use crate::replication::{self, OpenAnswer};
use crate::versions::first_version;

/// How many more times a new coordinator asks in-sync replicas that did not answer its
/// open in time, while none has.
const OPEN_RETRIES: usize = 2;

impl VolumeIo {
    /// Fences every in-sync replica at this coordinator's epoch. Replicas that do not
    /// answer leave the in-sync set; at least one must answer.
    /// Then makes the in-sync replicas equal where the previous coordinator's unfinished
    /// writes may have left them different (`reconcile`).
    pub fn open(&self) -> Result<()> {
        let replica = Some(self.replica_ref());
        let epoch = self.epoch;
        let in_sync_before = self.in_sync();
        // What each answering replica said: its watermark, and whether its host rebooted
        // since it was last used (see `replication::after_open`).
        let opened = Arc::new(Mutex::new(Vec::<OpenAnswer>::new()));
        // In-sync replicas whose files are gone: they hold nothing, so they leave the
        // in-sync set holding no version at all (a full resync rebuilds them).
        let missing = Arc::new(Mutex::new(Vec::<String>::new()));
        let local_node = self.local_node.clone();
        let call = |node: &str, mut c: crate::peers::PeerBlockClient| {
            let req = OpenRequest {
                replica: replica.clone(),
                epoch,
                min_version: 0,
                mark: 0,
            };
            let seen = opened.clone();
            let node = node.to_string();
            async move {
                let r = c.open(req).await?.into_inner();
                if r.missing {
                    return Err(tonic::Status::not_found(MISSING));
                }
                seen.lock().expect("opened").push(OpenAnswer {
                    node,
                    complete_below: r.complete_below,
                    reboot_below: r.rebooted.then_some(r.reboot_below),
                });
                Ok(())
            }
        };
        let mut answers = self.fan_out(&self.in_sync(), call, || {
            let r = self.pool.open_replica(
                &self.volume_id,
                self.size,
                epoch,
                0,
                self.create_in_sync,
                self.descriptor.get(),
            )?;
            if r.state == OpenState::Missing {
                missing.lock().expect("missing").push(local_node.clone());
                return Err(Error::ReplicaMissing(MISSING.into()));
            }
            opened.lock().expect("opened").push(OpenAnswer {
                node: local_node.clone(),
                complete_below: r.complete_below,
                reboot_below: r.reboot_below,
            });
            Ok(())
        });
        // A replica that is slow to answer (a busy disk, a new connection on a loaded
        // host) is not a dead one: while no in-sync replica has answered, those that
        // timed out are asked again before the open gives up on all of them.
        for _ in 0..OPEN_RETRIES {
            if answers.iter().any(|(_, r)| r.is_ok()) {
                break;
            }
            let again: BTreeSet<String> = answers
                .iter()
                .filter(|(n, r)| {
                    *n != self.local_node && matches!(r, Err(Error::NodeUnreachable { .. }))
                })
                .map(|(n, _)| n.clone())
                .collect();
            if again.is_empty() {
                break;
            }
            warn!(volume = %self.volume_id, ?again, "no in-sync replica answered the open: asking again");
            // Only remote replicas are asked again: the local one answered for itself.
            for (node, res) in self.fan_out(&again, call, || Ok(())) {
                if let Some(slot) = answers.iter_mut().find(|(n, _)| *n == node) {
                    slot.1 = res;
                }
            }
        }
        let mut missing = std::mem::take(&mut *missing.lock().expect("missing"));
        for (node, res) in &answers {
            if matches!(res, Err(e) if e.to_string().contains(MISSING)) && !missing.contains(node) {
                missing.push(node.clone());
            }
        }
        if !missing.is_empty() {
            warn!(volume = %self.volume_id, ?missing, "in-sync replicas whose files are missing: rebuilt by a full resync");
            if missing.len() < self.in_sync().len() {
                self.remove_from_in_sync(&missing, 0)?;
            }
        }
        // Writes of the previous coordinator that were not acknowledged may have reached
        // only some replicas: a replica that left now is resynced from the start of the
        // previous epoch, which covers them.
        let watermark = first_version(self.epoch.saturating_sub(1)).saturating_sub(1);
        self.settle(answers, Some(watermark))?;
        let in_sync = self.in_sync();
        let answered: Vec<OpenAnswer> = std::mem::take(&mut *opened.lock().expect("opened"))
            .into_iter()
            .filter(|a| in_sync.contains(&a.node))
            .collect();
        let plan = replication::after_open(&answered, watermark);
        for (node, at) in &plan.leave {
            warn!(volume = %self.volume_id, %node, left_at = at, "replica's host rebooted since its last sync: it leaves the in-sync set and is resynced");
            self.remove_from_in_sync(std::slice::from_ref(node), *at)?;
        }
        crate::reconcile::reconcile(self, plan.reconcile_above)?;
        // Durable on every in-sync replica before anything is served: the reconciled
        // regions, and whatever the previous coordinator left unflushed. This flush's
        // watermark is where a replica whose node restarts later is resynced from.
        self.flush()?;
        // Rebooted replicas that stayed are trusted only because no replica that did not
        // reboot was there to say otherwise; one that was in sync but did not answer may
        // be such a one, so their marks stay (a later takeover that reaches it resyncs
        // them from it).
        let everyone = self.in_sync() == in_sync_before;
        let clear: Vec<String> = plan
            .clear_marks
            .iter()
            .filter(|n| self.in_sync().contains(*n))
            .cloned()
            .collect();
        if everyone && !clear.is_empty() {
            self.clear_marks(&clear);
        }
        Ok(())
    }

    /// Clears the reboot (and catching-up) marks of in-sync replicas that stayed in sync
    /// because every host rebooted (they are equal and durable now). A mark left in place only costs a
    /// resync at a later takeover.
    fn clear_marks(&self, nodes: &[String]) {
        let set: BTreeSet<String> = nodes.iter().cloned().collect();
        let replica = Some(self.replica_ref());
        let epoch = self.epoch;
        let answers = self.fan_out(
            &set,
            |_, mut c| {
                let req = OpenRequest {
                    replica: replica.clone(),
                    epoch,
                    min_version: 0,
                    mark: 2,
                };
                async move { c.open(req).await.map(|_| ()) }
            },
            || self.pool.set_catching_up(&self.volume_id, false),
        );
        for (node, res) in answers {
            if let Err(e) = res {
                warn!(volume = %self.volume_id, %node, error = %e, "could not clear a catching-up mark");
            }
        }
    }
}
