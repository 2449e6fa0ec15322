//! A replica whose answers a test sets (answer, fail, hang), served over the real block
//! API. Shared by the coordinator tests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_blockd::records::{VolumeRecord, RECORD_VERSION};
use shoal_proto::block::block_server::Block;
use shoal_proto::block::*;
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Mode {
    Answer,
    Fail,
    Hang,
    /// Hang writes at this offset, answer everything else (not every test binary that
    /// shares this module uses it).
    #[allow(dead_code)]
    HangWriteAt(u64),
    /// Refuse as a replica whose node restarted since it was opened.
    #[allow(dead_code)]
    Restarted,
}

/// A replica whose behaviour the test sets.
#[derive(Clone)]
pub struct FakeReplica {
    pub mode: Arc<Mutex<Mode>>,
    /// Writes it acknowledged.
    pub writes: Arc<Mutex<u32>>,
    /// Requests that reached it, answered or not.
    pub arrived: Arc<AtomicU32>,
    /// ("write", version) and ("open", min_version) in arrival order.
    pub log: Arc<Mutex<Vec<(&'static str, u64)>>>,
}

impl Default for FakeReplica {
    fn default() -> Self {
        Self {
            mode: Arc::new(Mutex::new(Mode::Answer)),
            writes: Arc::new(Mutex::new(0)),
            arrived: Arc::new(AtomicU32::new(0)),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl FakeReplica {
    async fn act(&self) -> Result<(), Status> {
        self.act_on(None).await
    }

    async fn act_on(&self, write_at: Option<u64>) -> Result<(), Status> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Answer => Ok(()),
            Mode::HangWriteAt(at) if write_at != Some(at) => Ok(()),
            Mode::Fail => Err(Status::internal("disk on fire")),
            Mode::Restarted => Err(Status::failed_precondition(shoal_blockd::pool::RESTARTED)),
            Mode::Hang | Mode::HangWriteAt(_) => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    }
}

#[tonic::async_trait]
impl Block for FakeReplica {
    async fn read(&self, r: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        self.act().await?;
        let len = r.into_inner().length as usize;
        Ok(Response::new(ReadReply {
            data: vec![0u8; len].into(),
        }))
    }
    async fn write(&self, r: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        self.log
            .lock()
            .unwrap()
            .push(("write", r.get_ref().version));
        self.act_on(Some(r.get_ref().offset)).await?;
        *self.writes.lock().unwrap() += 1;
        Ok(Response::new(WriteReply {}))
    }
    async fn flush(&self, _r: Request<FlushRequest>) -> Result<Response<FlushReply>, Status> {
        self.act().await?;
        Ok(Response::new(FlushReply {}))
    }
    async fn discard(&self, _r: Request<DiscardRequest>) -> Result<Response<DiscardReply>, Status> {
        self.act().await?;
        Ok(Response::new(DiscardReply {}))
    }
    async fn delete_replica(
        &self,
        _r: Request<ReplicaRef>,
    ) -> Result<Response<DeleteReplicaReply>, Status> {
        Ok(Response::new(DeleteReplicaReply {}))
    }
    async fn usage(&self, _r: Request<UsageRequest>) -> Result<Response<UsageReply>, Status> {
        Ok(Response::new(UsageReply::default()))
    }
    async fn open(&self, r: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        self.log
            .lock()
            .unwrap()
            .push(("open", r.get_ref().min_version));
        self.act().await?;
        Ok(Response::new(OpenReply {
            epoch: r.into_inner().epoch,
            complete_below: 0,
            ..Default::default()
        }))
    }
    type ChangedRegionsStream = shoal_blockd::services::ChangedStream;
    async fn changed_regions(
        &self,
        _r: Request<ChangedRequest>,
    ) -> Result<Response<Self::ChangedRegionsStream>, Status> {
        Ok(Response::new(shoal_blockd::services::changed_stream(
            Vec::new(),
        )))
    }
    async fn read_region(
        &self,
        _r: Request<RegionRequest>,
    ) -> Result<Response<RegionData>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn write_region(
        &self,
        _r: Request<WriteRegionRequest>,
    ) -> Result<Response<WriteReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A 64 MiB volume record with `replicas`, attached to node "me" at `epoch`.
pub fn volume_record(
    id: &str,
    replicas: Vec<String>,
    in_sync: Vec<String>,
    epoch: u64,
) -> VolumeRecord {
    VolumeRecord {
        v: RECORD_VERSION,
        id: id.into(),
        name: "v".into(),
        size_bytes: 64 << 20,
        repl: replicas.len() as u32,
        block_size: 4096,
        fs: "none".into(),
        labels: Default::default(),
        io_priority: "medium".into(),
        shared: false,
        replicas,
        attached_node: Some("me".into()),
        device_path: String::new(),
        mount_path: String::new(),
        formatted: false,
        epoch,
        created_unix: 0,
        in_sync: Some(in_sync),
        left_at: Default::default(),
        resync: Default::default(),
        resync_bytes: Default::default(),
        retired: Vec::new(),
        replicas_made: false,
    }
}

/// Makes `pool`'s replica of `rec` as the volume's first coordinator did, if it is not
/// there yet: these tests open volumes at later epochs, whose in-sync replicas exist
/// (a real node never makes an in-sync replica empty after the first epoch).
pub fn held_before(pool: &shoal_blockd::pool::Pool, rec: &shoal_blockd::records::VolumeRecord) {
    if !pool.replica_ids().unwrap().contains(&rec.id) {
        pool.open_replica(&rec.id, rec.size_bytes, 1, 0, true, None)
            .unwrap();
    }
}
