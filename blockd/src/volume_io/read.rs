//! Reads: from the local in-sync replica, else from the first remote in-sync replica
//! that answers (through the read cache of a coordinator without a local replica), with
//! the fencing and restart checks a read needs.

use super::*;

impl VolumeIo {
    /// Reads `len` bytes at `offset` from an in-sync replica.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.check_fenced()?;
        let in_sync = self.in_sync();
        if in_sync.contains(&self.local_node) && self.is_local(&self.local_node) {
            let read = self
                .pool
                .read_at_epoch(&self.volume_id, self.size, offset, len, self.epoch);
            if let Err(Error::Fenced(_)) = &read {
                self.fence();
            }
            return read;
        }
        let Some(cache) = &self.cache else {
            return self.read_remote(&in_sync, offset, len);
        };
        // Region locks keep a write from landing between the remote read and the fill.
        let _range = self.lock_range(offset, len as u64);
        if let Some(hit) = cache.get(offset, len) {
            return Ok(hit);
        }
        let data = self.read_remote(&in_sync, offset, len)?;
        cache.put(offset, &data);
        Ok(data)
    }

    /// Reads from the first in-sync remote replica that answers.
    fn read_remote(&self, in_sync: &BTreeSet<String>, offset: u64, len: u32) -> Result<Vec<u8>> {
        let mut last_err = None;
        for r in self.replicas().iter().filter(|r| in_sync.contains(&r.node)) {
            let Target::Remote(client) = &r.target else {
                continue;
            };
            let mut c = (**client).clone();
            let req = ReadRequest {
                replica: Some(self.replica_ref()),
                offset,
                length: len,
                epoch: self.epoch,
            };
            let timeout = self.timeout;
            let res = self
                .rt
                .block_on(async move { tokio::time::timeout(timeout, c.read(req)).await });
            match res {
                Ok(Ok(reply)) => {
                    let data = reply.into_inner().data;
                    if data.len() == len as usize {
                        return Ok(data.to_vec());
                    }
                    last_err = Some(Error::Internal(format!(
                        "replica on {} returned {} bytes, asked {len}",
                        r.node,
                        data.len()
                    )));
                }
                Ok(Err(status)) => {
                    // A replica fenced at a newer epoch: this coordinator was replaced.
                    // No other replica may answer instead (one the successor did not
                    // reach would serve what the successor may have overwritten).
                    if status.code() == tonic::Code::FailedPrecondition
                        && status.message().contains("stale epoch")
                    {
                        self.fence();
                        return Err(Error::Fenced(format!(
                            "replica on {}: {}",
                            r.node,
                            status.message()
                        )));
                    }
                    // Its node restarted (maybe a power loss): it may lack acknowledged
                    // writes. It leaves the in-sync set like a restarted replica that
                    // refused a write, and another replica answers.
                    if status.message().contains(RESTARTED) {
                        // Not recorded (the store unreachable, or it is the last in-sync
                        // replica): it is not read from all the same; its next write
                        // fails and tries again.
                        if let Err(e) = self.leave_restarted(std::slice::from_ref(&r.node), "read")
                        {
                            warn!(volume = %self.volume_id, node = %r.node, error = %e, "cannot record that the replica left the in-sync set");
                        }
                    }
                    last_err = Some(status.into());
                }
                Err(_) => {
                    last_err = Some(Error::NodeUnreachable {
                        node: r.node.clone(),
                        reason: "read timed out".into(),
                    })
                }
            }
            warn!(volume = %self.volume_id, node = %r.node, "replica read failed, trying next");
        }
        Err(last_err.unwrap_or_else(|| Error::Internal("no in-sync replica to read".into())))
    }
}
