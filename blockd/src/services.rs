//! The gRPC services a node serves: thin adapters from protobuf to [`Node`] methods.

use std::sync::Arc;

use shoal_proto::block::{self as bpb, block_server::Block};
use shoal_proto::control::{self as cpb, control_server::Control};
use shoal_proto::CLUSTER_TOKEN_HEADER;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::Node;
use crate::pool::{OpenState, Stamp};
use crate::records::{self, VolumeRecord};
use crate::write_wire::WireWrite;

/// The control API (CLI to node).
pub struct ControlService(pub Arc<Node>);

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(&self, _req: Request<cpb::StatusRequest>) -> Reply<cpb::StatusReply> {
        Ok(Response::new(self.0.status().await?))
    }

    async fn create_volume(&self, req: Request<cpb::CreateVolumeRequest>) -> Reply<cpb::Volume> {
        Ok(Response::new(self.0.create_volume(req.into_inner()).await?))
    }

    async fn list_volumes(
        &self,
        _req: Request<cpb::ListVolumesRequest>,
    ) -> Reply<cpb::ListVolumesReply> {
        let volumes = self.0.list_volumes().await?;
        Ok(Response::new(cpb::ListVolumesReply { volumes }))
    }

    async fn inspect_volume(&self, req: Request<cpb::VolumeRef>) -> Reply<cpb::Volume> {
        let (rec, _) = self.0.volume_by_name(&req.into_inner().name).await?;
        Ok(Response::new(self.0.describe(&rec).await?))
    }

    async fn delete_volume(&self, req: Request<cpb::VolumeRef>) -> Reply<cpb::DeleteVolumeReply> {
        self.0.delete_volume(&req.into_inner().name).await?;
        Ok(Response::new(cpb::DeleteVolumeReply {}))
    }

    async fn attach_volume(&self, req: Request<cpb::AttachRequest>) -> Reply<cpb::AttachReply> {
        let req = req.into_inner();
        let rec = self.0.attach(&req.name, &req.node_id).await?;
        let volume = self.0.describe(&rec).await?;
        Ok(Response::new(cpb::AttachReply {
            volume: Some(volume),
        }))
    }

    async fn detach_volume(&self, req: Request<cpb::VolumeRef>) -> Reply<cpb::DetachReply> {
        self.0.detach(&req.into_inner().name).await?;
        Ok(Response::new(cpb::DetachReply {}))
    }

    async fn mount_volume(&self, req: Request<cpb::MountRequest>) -> Reply<cpb::MountReply> {
        let req = req.into_inner();
        let rec = self.0.mount(&req.name, &req.path).await?;
        let volume = self.0.describe(&rec).await?;
        Ok(Response::new(cpb::MountReply {
            volume: Some(volume),
        }))
    }

    async fn ha_update(&self, req: Request<cpb::HaUpdateRequest>) -> Reply<cpb::Volume> {
        let r = req.into_inner();
        Ok(Response::new(
            self.0.ha_update(&r.name, r.repl, &r.node_id).await?,
        ))
    }

    async fn fsck_volume(&self, req: Request<cpb::FsckRequest>) -> Reply<cpb::FsckReply> {
        let r = req.into_inner();
        Ok(Response::new(self.0.fsck(&r.name, r.repair).await?))
    }

    async fn create_join_token(
        &self,
        req: Request<cpb::JoinTokenRequest>,
    ) -> Reply<cpb::JoinTokenReply> {
        let ttl = match req.into_inner().ttl_secs {
            0 => std::time::Duration::from_secs(3600),
            s => std::time::Duration::from_secs(s),
        };
        let n = &self.0;
        let (token, expires_unix) =
            crate::auth::join::create(&n.meta, &n.keys, &n.cfg.secret, ttl, &n.id).await?;
        Ok(Response::new(cpb::JoinTokenReply {
            token,
            expires_unix,
        }))
    }

    async fn unmount_volume(&self, req: Request<cpb::UnmountRequest>) -> Reply<cpb::UnmountReply> {
        self.0.unmount(&req.into_inner().path).await?;
        Ok(Response::new(cpb::UnmountReply {}))
    }
}

/// The block API (node to node). Every call must carry the cluster token.
#[derive(Clone)]
pub struct BlockService(pub Arc<Node>);

/// The answer of `ChangedRegions`: pieces of [`CHANGED_PER_MESSAGE`] regions.
pub type ChangedStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<bpb::ChangedReply, Status>> + Send + 'static>,
>;

/// Regions per `ChangedRegions` message: 1 MiB of message, whatever the volume's size.
pub const CHANGED_PER_MESSAGE: usize = 64 << 10;

/// Streams `(region, version)` pairs as `ChangedRegions` messages.
pub fn changed_stream(changed: Vec<(u64, u64)>) -> ChangedStream {
    let pieces: Vec<Result<bpb::ChangedReply, Status>> = changed
        .chunks(CHANGED_PER_MESSAGE)
        .map(|c| {
            let (regions, versions) = c.iter().copied().unzip();
            Ok(bpb::ChangedReply { regions, versions })
        })
        .collect();
    Box::pin(tokio_stream::iter(pieces))
}

/// What a block call without the right token gets.
pub fn unauthenticated() -> Status {
    Status::unauthenticated("missing or wrong cluster token: not a member of this cluster")
}

impl BlockService {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let token = req
            .metadata()
            .get(CLUSTER_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        if self.token_ok(token) {
            Ok(())
        } else {
            Err(unauthenticated())
        }
    }

    /// Runs blocking pool I/O without stalling the other tasks. On a multi-threaded
    /// runtime it runs right here, the worker handing its other tasks to the rest of the
    /// pool (`block_in_place`): a replica write of a few blocks takes tens of
    /// microseconds, and the hop to the blocking pool and back cost several times that
    /// (it was most of a small replicated write's time).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.0.clone();
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(|| f(&node)).map_err(Status::from);
        }
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)
    }

    /// Whether `token` is this cluster's (the header every block call must carry).
    pub fn token_ok(&self, token: Option<&str>) -> bool {
        token.is_some_and(|t| t == self.0.token)
    }

    /// One replica write, its data in pieces (the frames it arrived in).
    pub async fn write_wire(&self, mut r: WireWrite) -> Result<(), Status> {
        let rep = replica(r.replica.take())?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: r.complete_below,
        };
        // A write that must log a new extent first waits for a sync of the log: never
        // on a runtime worker.
        let inline = !r.fua
            && r.data_len() <= INLINE_WRITE_MAX
            && self
                .0
                .pool
                .write_is_quick(&rep.volume_id, r.offset, r.data_len() as u64);
        let write = move |n: &Node| {
            let parts: Vec<&[u8]> = r.data.iter().map(|b| b.as_ref()).collect();
            n.pool.write_parts(
                &rep.volume_id,
                rep.size_bytes,
                r.offset,
                &parts,
                r.fua,
                stamp,
            )
        };
        if inline {
            // A few pages into the page cache: tens of microseconds, less than handing
            // the worker's other tasks to another thread would cost.
            write(&self.0).map_err(Status::from)
        } else {
            self.blocking(write).await
        }
    }
}

/// Replica writes up to this size (without FUA) run right on the async worker.
const INLINE_WRITE_MAX: usize = 64 << 10;

fn replica(r: Option<bpb::ReplicaRef>) -> Result<bpb::ReplicaRef, Status> {
    r.ok_or_else(|| Status::invalid_argument("replica is missing"))
}

#[tonic::async_trait]
impl Block for BlockService {
    async fn read(&self, req: Request<bpb::ReadRequest>) -> Reply<bpb::ReadReply> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        if r.length > (16 << 20) {
            return Err(Status::invalid_argument("read length over 16 MiB"));
        }
        let data = self
            .blocking(move |n| {
                n.pool
                    .read_at_epoch(&rep.volume_id, rep.size_bytes, r.offset, r.length, r.epoch)
            })
            .await?;
        Ok(Response::new(bpb::ReadReply { data: data.into() }))
    }

    async fn write(&self, req: Request<bpb::WriteRequest>) -> Reply<bpb::WriteReply> {
        // The node's server takes this call off the HTTP/2 frames (`write_http`); this
        // path serves a `BlockServer` without that route (in-memory test channels).
        self.check(&req)?;
        let r = req.into_inner();
        self.write_wire(WireWrite {
            replica: r.replica,
            offset: r.offset,
            data: vec![r.data],
            fua: r.fua,
            epoch: r.epoch,
            version: r.version,
            complete_below: r.complete_below,
        })
        .await?;
        Ok(Response::new(bpb::WriteReply {}))
    }

    async fn flush(&self, req: Request<bpb::FlushRequest>) -> Reply<bpb::FlushReply> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        self.blocking(move |n| {
            n.pool
                .flush(&rep.volume_id, rep.size_bytes, r.epoch, r.complete_below)
        })
        .await?;
        Ok(Response::new(bpb::FlushReply {}))
    }

    async fn discard(&self, req: Request<bpb::DiscardRequest>) -> Reply<bpb::DiscardReply> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: r.complete_below,
        };
        self.blocking(move |n| {
            n.pool
                .discard(&rep.volume_id, rep.size_bytes, r.offset, r.length, stamp)
        })
        .await?;
        Ok(Response::new(bpb::DiscardReply {}))
    }

    async fn open(&self, req: Request<bpb::OpenRequest>) -> Reply<bpb::OpenReply> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        // The caller's numbers are checked against the volume record, not trusted: an
        // epoch past the record's would fence the real coordinator out forever.
        let node = &self.0;
        let kv = node
            .meta
            .get(&node.keys.volume(&rep.volume_id))
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {} has no record", rep.volume_id)))?;
        let rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
        if r.epoch > rec.epoch {
            return Err(Status::failed_precondition(format!(
                "epoch {} is newer than volume {}'s record ({})",
                r.epoch, rec.id, rec.epoch
            )));
        }
        if rep.size_bytes != rec.size_bytes || !rec.keeps_data_on(&node.id) {
            return Err(Status::failed_precondition(format!(
                "volume {} of {} bytes has no replica of {} bytes on this node",
                rec.id, rec.size_bytes, rep.size_bytes
            )));
        }
        let create = rec.may_create_replica(&node.id);
        let desc = rec.descriptor(&node.cfg.cluster_id, &node.cluster_uuid);
        let mark = match r.mark {
            0 => None,
            1 => Some(true),
            2 if rec.in_sync().contains(&node.id) => Some(false),
            2 => {
                return Err(Status::failed_precondition(format!(
                    "volume {}'s record does not count this replica in sync",
                    rec.id
                )))
            }
            3 => None,
            m => return Err(Status::invalid_argument(format!("unknown mark {m}"))),
        };
        let clear_reboot = r.mark == 3;
        let opened = self
            .blocking(move |n| {
                if mark == Some(true) {
                    n.pool.allow_reopen(&rep.volume_id);
                }
                let o = n.pool.open_replica(
                    &rep.volume_id,
                    rep.size_bytes,
                    r.epoch,
                    r.min_version,
                    create,
                    Some(&desc),
                )?;
                if let (Some(on), true) = (mark, o.state != OpenState::Missing) {
                    n.pool.set_catching_up(&rep.volume_id, on)?;
                }
                if clear_reboot && o.state != OpenState::Missing {
                    n.pool.clear_reboot(&rep.volume_id)?;
                }
                Ok(o)
            })
            .await?;
        Ok(Response::new(bpb::OpenReply {
            epoch: opened.epoch,
            complete_below: opened.complete_below,
            created: opened.state == OpenState::Created,
            missing: opened.state == OpenState::Missing,
            rebooted: opened.reboot_below.is_some(),
            reboot_below: opened.reboot_below.unwrap_or(0),
        }))
    }

    type ChangedRegionsStream = ChangedStream;

    async fn changed_regions(
        &self,
        req: Request<bpb::ChangedRequest>,
    ) -> Reply<Self::ChangedRegionsStream> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        let changed = self
            .blocking(move |n| {
                n.pool
                    .changed_regions(&rep.volume_id, rep.size_bytes, r.after)
            })
            .await?;
        Ok(Response::new(changed_stream(changed)))
    }

    async fn read_region(&self, req: Request<bpb::RegionRequest>) -> Reply<bpb::RegionData> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        let (data, version) = self
            .blocking(move |n| n.pool.read_region(&rep.volume_id, rep.size_bytes, r.region))
            .await?;
        Ok(Response::new(bpb::RegionData {
            data: data.into(),
            version,
        }))
    }

    async fn write_region(&self, req: Request<bpb::WriteRegionRequest>) -> Reply<bpb::WriteReply> {
        self.check(&req)?;
        let r = req.into_inner();
        let rep = replica(r.replica)?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: 0,
        };
        self.blocking(move |n| {
            n.pool
                .write_region(&rep.volume_id, rep.size_bytes, r.region, &r.data, stamp)
        })
        .await?;
        Ok(Response::new(bpb::WriteReply {}))
    }

    async fn delete_replica(
        &self,
        req: Request<bpb::ReplicaRef>,
    ) -> Reply<bpb::DeleteReplicaReply> {
        self.check(&req)?;
        let rep = req.into_inner();
        // Only on a positive record: a tombstone, or the volume's record naming other
        // nodes. The caller's word is not enough.
        if !matches!(
            crate::node::deletion_evidence(&self.0, &rep.volume_id).await?,
            crate::node::Evidence::Unwanted(_)
        ) {
            return Err(Status::failed_precondition(format!(
                "volume {}: no tombstone or record says its replica here is unwanted; kept",
                rep.volume_id
            )));
        }
        self.blocking(move |n| n.pool.delete(&rep.volume_id))
            .await?;
        Ok(Response::new(bpb::DeleteReplicaReply {}))
    }

    async fn usage(&self, req: Request<bpb::UsageRequest>) -> Reply<bpb::UsageReply> {
        self.check(&req)?;
        let ids = req.into_inner().volume_ids;
        if ids.len() > 10_000 {
            return Err(Status::invalid_argument("too many volume ids"));
        }
        let mut volume_used = std::collections::HashMap::new();
        for id in ids {
            let used = self.0.pool.replica_used(&id)?;
            volume_used.insert(id, used);
        }
        Ok(Response::new(bpb::UsageReply {
            capacity_bytes: self.0.pool.capacity(),
            pool_used_bytes: self.0.pool.used(),
            volume_used,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn changed_regions_come_in_bounded_pieces_in_order() {
        let n = 2 * CHANGED_PER_MESSAGE + 5;
        let list: Vec<(u64, u64)> = (0..n as u64).map(|r| (r, r * 10)).collect();
        let pieces: Vec<bpb::ChangedReply> = changed_stream(list.clone())
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(pieces.len(), 3);
        assert!(pieces
            .iter()
            .all(|p| p.regions.len() <= CHANGED_PER_MESSAGE));
        let back: Vec<(u64, u64)> = pieces
            .into_iter()
            .flat_map(|p| p.regions.into_iter().zip(p.versions))
            .collect();
        assert_eq!(back, list);
        assert!(changed_stream(Vec::new()).next().await.is_none());
    }
}
