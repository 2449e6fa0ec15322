//! Replicated I/O for one attached volume: what the coordinator does with each request.
//!
//! A write goes to every replica in parallel (the local pool directly, remote replicas
//! over the block API) and succeeds only when all of them have it; with FUA or a flush
//! it is durable on each. A read is served by the local replica when this node holds
//! one, otherwise by the first remote replica that answers (remote data access).
//!
//! The methods are synchronous: they run on FUSE session threads and drive the async
//! gRPC calls on the node's runtime through a handle.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::block::{DiscardRequest, FlushRequest, ReadRequest, ReplicaRef, WriteRequest};
use tracing::warn;

use crate::error::{Error, Result};
use crate::peers::PeerBlockClient;
use crate::pool::Pool;

/// How long one replica may take to answer a block request.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(15);

/// A replica on another node.
pub struct RemoteReplica {
    pub node: String,
    pub client: PeerBlockClient,
}

/// See the module doc.
pub struct VolumeIo {
    volume_id: String,
    size: u64,
    /// Whether this node holds a replica in its own pool.
    local: bool,
    pool: Arc<Pool>,
    remotes: Vec<RemoteReplica>,
    rt: tokio::runtime::Handle,
}

impl VolumeIo {
    pub fn new(
        volume_id: String,
        size: u64,
        local: bool,
        pool: Arc<Pool>,
        remotes: Vec<RemoteReplica>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            volume_id,
            size,
            local,
            pool,
            remotes,
            rt,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn replica_ref(&self) -> Option<ReplicaRef> {
        Some(ReplicaRef {
            volume_id: self.volume_id.clone(),
            size_bytes: self.size,
        })
    }

    /// Runs `call` against every remote replica in parallel and `local` on this thread,
    /// then waits for all. Any failure fails the whole operation.
    fn fan_out<F, Fut>(&self, what: &str, call: F, local: impl FnOnce() -> Result<()>) -> Result<()>
    where
        F: Fn(PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        let pending: Vec<_> = self
            .remotes
            .iter()
            .map(|r| {
                let fut = call(r.client.clone());
                let timed = async move { tokio::time::timeout(REPLICA_TIMEOUT, fut).await };
                (r.node.clone(), self.rt.spawn(timed))
            })
            .collect();
        let local_result = if self.local { local() } else { Ok(()) };
        let mut first_err = local_result.err();
        for (node, handle) in pending {
            let outcome = self.rt.block_on(handle);
            let err = match outcome {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(status))) => Error::from(status),
                Ok(Err(_)) => Error::NodeUnreachable {
                    node: node.clone(),
                    reason: format!("{what} timed out"),
                },
                Err(e) => Error::Internal(e.to_string()),
            };
            warn!(volume = %self.volume_id, %node, error = %err, "replica {what} failed");
            first_err.get_or_insert(err);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes `data` at `offset` on every replica.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let payload = Bytes::copy_from_slice(data);
        let replica = self.replica_ref();
        self.fan_out(
            "write",
            |mut c| {
                let req = WriteRequest {
                    replica: replica.clone(),
                    offset,
                    data: payload.clone(),
                    fua,
                };
                async move { c.write(req).await.map(|_| ()) }
            },
            || {
                self.pool
                    .write(&self.volume_id, self.size, offset, data, fua)
            },
        )
    }

    /// Makes every acknowledged write durable on every replica.
    pub fn flush(&self) -> Result<()> {
        let replica = self.replica_ref();
        self.fan_out(
            "flush",
            |mut c| {
                let req = FlushRequest {
                    replica: replica.clone(),
                };
                async move { c.flush(req).await.map(|_| ()) }
            },
            || self.pool.flush(&self.volume_id, self.size),
        )
    }

    /// Frees a range on every replica.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let replica = self.replica_ref();
        self.fan_out(
            "discard",
            |mut c| {
                let req = DiscardRequest {
                    replica: replica.clone(),
                    offset,
                    length: len,
                };
                async move { c.discard(req).await.map(|_| ()) }
            },
            || self.pool.discard(&self.volume_id, self.size, offset, len),
        )
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        if self.local {
            return self.pool.read(&self.volume_id, self.size, offset, len);
        }
        let mut last_err = None;
        for r in &self.remotes {
            let mut c = r.client.clone();
            let req = ReadRequest {
                replica: self.replica_ref(),
                offset,
                length: len,
            };
            let res = self
                .rt
                .block_on(async move { tokio::time::timeout(REPLICA_TIMEOUT, c.read(req)).await });
            match res {
                Ok(Ok(reply)) => {
                    let data = reply.into_inner().data;
                    if data.len() != len as usize {
                        last_err = Some(Error::Internal(format!(
                            "replica on {} returned {} bytes, asked {len}",
                            r.node,
                            data.len()
                        )));
                        continue;
                    }
                    return Ok(data.to_vec());
                }
                Ok(Err(status)) => last_err = Some(status.into()),
                Err(_) => {
                    last_err = Some(Error::NodeUnreachable {
                        node: r.node.clone(),
                        reason: "read timed out".into(),
                    })
                }
            }
            warn!(volume = %self.volume_id, node = %r.node, "replica read failed, trying next");
        }
        Err(last_err.unwrap_or_else(|| Error::Internal("volume has no replica".into())))
    }
}
