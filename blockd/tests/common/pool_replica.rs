//! A replica served over the real block API from a real pool (files in a temporary
//! directory), with one fault a test can set: writes at one offset are held (they never
//! reach the pool while held, and fail when let go), as a replica behind a slow link
//! while its coordinator dies. Used by the takeover tests.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_blockd::pool::{Pool, Stamp};
use shoal_proto::block::block_server::Block;
use shoal_proto::block::*;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct PoolReplica {
    pub pool: Arc<Pool>,
    /// Writes at this offset are held (u64::MAX: none).
    pub hold_write_at: Arc<AtomicU64>,
    /// Writes held right now.
    pub held: Arc<AtomicU32>,
    /// Region copies (`WriteRegion`) received.
    pub region_writes: Arc<AtomicU32>,
}

impl PoolReplica {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            hold_write_at: Arc::new(AtomicU64::new(u64::MAX)),
            held: Arc::new(AtomicU32::new(0)),
            region_writes: Arc::new(AtomicU32::new(0)),
        }
    }

    pub fn let_go(&self) {
        self.hold_write_at.store(u64::MAX, Ordering::SeqCst);
    }
}

fn rep(r: Option<ReplicaRef>) -> Result<ReplicaRef, Status> {
    r.ok_or_else(|| Status::invalid_argument("replica is missing"))
}

fn status(e: shoal_blockd::error::Error) -> Status {
    Status::from(e)
}

#[tonic::async_trait]
impl Block for PoolReplica {
    async fn read(&self, r: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let data = self
            .pool
            .read_at_epoch(&p.volume_id, p.size_bytes, r.offset, r.length, r.epoch)
            .map_err(status)?;
        Ok(Response::new(ReadReply { data: data.into() }))
    }
    async fn write(&self, r: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let r = r.into_inner();
        if r.offset == self.hold_write_at.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            while self.hold_write_at.load(Ordering::SeqCst) == r.offset {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return Err(Status::unavailable("held write let go: never applied"));
        }
        let p = rep(r.replica)?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: r.complete_below,
        };
        self.pool
            .write(&p.volume_id, p.size_bytes, r.offset, &r.data, r.fua, stamp)
            .map_err(status)?;
        Ok(Response::new(WriteReply {}))
    }
    async fn flush(&self, r: Request<FlushRequest>) -> Result<Response<FlushReply>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        self.pool
            .flush(&p.volume_id, p.size_bytes, r.epoch, r.complete_below)
            .map_err(status)?;
        Ok(Response::new(FlushReply {}))
    }
    async fn discard(&self, r: Request<DiscardRequest>) -> Result<Response<DiscardReply>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: r.complete_below,
        };
        self.pool
            .discard(&p.volume_id, p.size_bytes, r.offset, r.length, stamp)
            .map_err(status)?;
        Ok(Response::new(DiscardReply {}))
    }
    async fn delete_replica(
        &self,
        _r: Request<ReplicaRef>,
    ) -> Result<Response<DeleteReplicaReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn usage(&self, _r: Request<UsageRequest>) -> Result<Response<UsageReply>, Status> {
        Ok(Response::new(UsageReply::default()))
    }
    async fn open(&self, r: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let o = self
            .pool
            // A real node decides `create` from the volume record; these tests have
            // none, and their replicas are made on first open.
            .open_replica(
                &p.volume_id,
                p.size_bytes,
                r.epoch,
                r.min_version,
                true,
                None,
            )
            .map_err(status)?;
        Ok(Response::new(OpenReply {
            epoch: o.epoch,
            complete_below: o.complete_below,
            created: o.state == shoal_blockd::pool::OpenState::Created,
            missing: o.state == shoal_blockd::pool::OpenState::Missing,
            rebooted: o.reboot_below.is_some(),
            reboot_below: o.reboot_below.unwrap_or(0),
        }))
    }
    type ChangedRegionsStream = shoal_blockd::services::ChangedStream;
    async fn changed_regions(
        &self,
        r: Request<ChangedRequest>,
    ) -> Result<Response<Self::ChangedRegionsStream>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let list = self
            .pool
            .changed_regions(&p.volume_id, p.size_bytes, r.after)
            .map_err(status)?;
        Ok(Response::new(shoal_blockd::services::changed_stream(list)))
    }
    async fn read_region(&self, r: Request<RegionRequest>) -> Result<Response<RegionData>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let (data, version) = self
            .pool
            .read_region(&p.volume_id, p.size_bytes, r.region)
            .map_err(status)?;
        Ok(Response::new(RegionData {
            data: data.into(),
            version,
        }))
    }
    async fn write_region(
        &self,
        r: Request<WriteRegionRequest>,
    ) -> Result<Response<WriteReply>, Status> {
        let r = r.into_inner();
        let p = rep(r.replica)?;
        let stamp = Stamp {
            epoch: r.epoch,
            version: r.version,
            complete_below: 0,
        };
        self.pool
            .write_region(&p.volume_id, p.size_bytes, r.region, &r.data, stamp)
            .map_err(status)?;
        self.region_writes.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(WriteReply {}))
    }
}
