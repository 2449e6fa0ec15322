//! The coordinator's replication state machine on a virtual clock and an in-memory
//! transport: the replicas are fake block services reached over `tokio::io::duplex`
//! pipes (real gRPC framing, no sockets), and time only moves when the test advances it
//! (`tokio::time::pause`). So "a hung replica costs exactly one timeout" is checked to
//! the millisecond of virtual time, with no real waiting and no timing flakiness.
//!
//! Covered: partial failures (one replica fails, one hangs, one answers), a timeout
//! that is not yet due, writes concurrent with a resync (catch-up and rejoin), a failed
//! catch-up replica that must not degrade the volume, an epoch change under a write, and
//! the ordering of overlapping writes (disjoint ones are not held up by a hung one).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_blockd::meta::{EmbeddedStore, MetaStore};
use shoal_blockd::peers::Peers;
use shoal_blockd::pool::Pool;
use shoal_blockd::records::{self, Keys, VolumeRecord};
use shoal_blockd::volume_io::{Replica, Target, VolumeIo};
use shoal_proto::block::block_server::BlockServer;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Server, Uri};

mod common;
use common::{FakeReplica, Mode};

const VOL: &str = "fedcba9876543210";
const TIMEOUT: Duration = Duration::from_secs(3);

/// A channel to `fake` over in-memory pipes: every connection the client makes is one
/// `duplex` pair whose other end the fake's gRPC server serves.
fn in_memory_channel(fake: FakeReplica) -> Channel {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
    let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let incoming = tokio_stream::StreamExt::map(incoming, Ok::<_, std::io::Error>);
    tokio::spawn(
        Server::builder()
            .add_service(BlockServer::new(fake))
            .serve_with_incoming(incoming),
    );
    Endpoint::from_static("http://fake-replica").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(4 << 20);
                tx.send(server)
                    .map_err(|_| std::io::Error::other("fake replica gone"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        },
    ))
}

struct Setup {
    io: Arc<VolumeIo>,
    meta: MetaStore,
    keys: Keys,
    fakes: Vec<FakeReplica>,
    _dir: tempfile::TempDir,
}

/// A volume with a local replica "me" and `remotes` fakes "r0", "r1", …; `in_sync`
/// names the replicas the record starts with in sync (all when None).
async fn setup(remotes: usize, in_sync: Option<Vec<&str>>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::Embedded(EmbeddedStore::open(&dir.path().join("meta.json")).unwrap());
    let keys = Keys::new("t");
    let pool = Arc::new(Pool::open(&dir.path().join("pool"), Some(1 << 30)).unwrap());
    let peers = Peers::new(&"00".repeat(32));
    let mut replicas = vec![Replica {
        node: "me".into(),
        target: Target::Local,
    }];
    let mut fakes = Vec::new();
    for i in 0..remotes {
        let fake = FakeReplica::default();
        replicas.push(Replica {
            node: format!("r{i}"),
            target: Target::Remote(Box::new(peers.block_over(in_memory_channel(fake.clone())))),
        });
        fakes.push(fake);
    }
    let names: Vec<String> = replicas.iter().map(|r| r.node.clone()).collect();
    let in_sync = in_sync
        .map(|v| v.into_iter().map(String::from).collect())
        .unwrap_or_else(|| names.clone());
    let rec = common::volume_record(VOL, names, in_sync, 7);
    meta.put(&keys.volume(VOL), &records::encode(&rec))
        .await
        .unwrap();
    common::held_before(&pool, &rec);
    let io = Arc::new(VolumeIo::new(
        &rec,
        "me".into(),
        pool,
        replicas,
        meta.clone(),
        keys.clone(),
        TIMEOUT,
        tokio::runtime::Handle::current(),
    ));
    let opener = io.clone();
    tokio::task::spawn_blocking(move || opener.open())
        .await
        .unwrap()
        .unwrap();
    Setup {
        io,
        meta,
        keys,
        fakes,
        _dir: dir,
    }
}

impl Setup {
    async fn record(&self) -> VolumeRecord {
        let kv = self
            .meta
            .get(&self.keys.volume(VOL))
            .await
            .unwrap()
            .unwrap();
        records::decode(&kv.key, &kv.value).unwrap()
    }

    fn set(&self, i: usize, m: Mode) {
        *self.fakes[i].mode.lock().unwrap() = m;
    }

    /// Starts a write of `byte` at `offset` on a blocking thread (the coordinator's API
    /// is synchronous, as FUSE calls it). A running blocking task keeps tokio from
    /// advancing the paused clock by itself: only the test moves time.
    fn write(&self, offset: u64, byte: u8) -> JoinHandle<shoal_blockd::Result<()>> {
        let io = self.io.clone();
        tokio::task::spawn_blocking(move || io.write(offset, &[byte; 4096], false))
    }

    /// Waits (in real time, the virtual clock standing still) until fake `i` has seen
    /// `n` requests in all.
    async fn arrived(&self, i: usize, n: u32) {
        for _ in 0..10_000 {
            if self.fakes[i].arrived.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_micros(200));
        }
        panic!("fake replica r{i} never saw request {n}");
    }
}

/// Waits in real time (the virtual clock standing still) for a write that is due now;
/// panics instead of hanging when it is still waiting on a timer that has not expired.
async fn finished<T>(w: JoinHandle<T>) -> T {
    for _ in 0..2_000 {
        if w.is_finished() {
            return w.await.unwrap();
        }
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the write is still waiting although its timeout has passed");
}

/// Lets the runtime and the blocking thread run for a while of real time with the
/// virtual clock stopped.
async fn settle_real_time() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_replica_stalls_the_write_exactly_one_timeout() {
    let s = setup(1, None).await;
    let arrived_before = s.fakes[0].arrived.load(Ordering::SeqCst);
    s.set(0, Mode::Hang);
    let start = Instant::now();
    let w = s.write(0, 1);
    s.arrived(0, arrived_before + 1).await;

    // Just before the timeout the write is still waiting, and nothing was recorded.
    tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
    settle_real_time().await;
    assert!(
        !w.is_finished(),
        "acknowledged before the replica timed out"
    );
    assert!(s.record().await.in_sync().contains(&"r0".to_string()));

    // At the timeout the replica leaves the in-sync set, then the write is acknowledged.
    tokio::time::advance(Duration::from_millis(1)).await;
    finished(w).await.unwrap();
    assert_eq!(start.elapsed(), TIMEOUT, "virtual time the writer waited");
    let rec = s.record().await;
    assert_eq!(rec.in_sync(), vec!["me".to_string()]);
    assert!(rec.left_at.contains_key("r0"));

    // The next write goes to the local replica only: no virtual time passes.
    let start = Instant::now();
    finished(s.write(4096, 2)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn writes_that_do_not_overlap_fly_together_and_overlapping_ones_wait_in_order() {
    let s = setup(1, None).await;
    s.set(0, Mode::HangWriteAt(0));
    let before = s.fakes[0].arrived.load(Ordering::SeqCst);
    let w1 = s.write(0, 1);
    s.arrived(0, before + 1).await;
    // Same 1 MiB region, other bytes: not held up by the hung write.
    let start = Instant::now();
    finished(s.write(4096, 2)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "a disjoint write waited");
    // The same bytes: waits for the first write, then lands after it everywhere.
    let w3 = s.write(0, 3);
    settle_real_time().await;
    assert!(
        !w3.is_finished(),
        "an overlapping write overtook the one in flight"
    );
    tokio::time::advance(TIMEOUT).await;
    finished(w1).await.unwrap();
    finished(w3).await.unwrap();
    let io = s.io.clone();
    let back = tokio::task::spawn_blocking(move || io.read(0, 8192))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &back[..4096],
        &[3u8; 4096][..],
        "the later write is what stays"
    );
    assert_eq!(&back[4096..], &[2u8; 4096][..]);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_failed_everywhere_cannot_land_after_a_newer_one() {
    // Only the remote replica is in sync: when it does not answer, the write fails and
    // the replica stays in sync, with that write possibly still on its way.
    let s = setup(1, Some(vec!["r0"])).await;
    s.set(0, Mode::HangWriteAt(0));
    let before = s.fakes[0].arrived.load(Ordering::SeqCst);
    let w1 = s.write(0, 1);
    s.arrived(0, before + 1).await;
    tokio::time::advance(TIMEOUT).await;
    assert!(finished(w1).await.is_err(), "no in-sync replica has it");
    assert!(s.record().await.in_sync().contains(&"r0".to_string()));
    let v1 = s.fakes[0].log.lock().unwrap().last().unwrap().1;
    // The next write first raises the replica's floor above the failed one, then goes.
    s.set(0, Mode::Answer);
    finished(s.write(0, 2)).await.unwrap();
    let log = s.fakes[0].log.lock().unwrap().clone();
    let tail = &log[log.len() - 2..];
    assert_eq!(tail[0], ("open", v1 + 1), "{log:?}");
    assert_eq!(tail[1].0, "write");
    assert!(tail[1].1 > v1);
    // Once raised, it is not asked again.
    finished(s.write(8192, 3)).await.unwrap();
    assert_eq!(s.fakes[0].log.lock().unwrap().last().unwrap().0, "write");
}

#[tokio::test(start_paused = true)]
async fn a_replica_owed_a_floor_whose_node_restarted_leaves_instead_of_failing_writes() {
    let s = setup(2, Some(vec!["r0", "r1"])).await;
    s.set(0, Mode::HangWriteAt(0));
    s.set(1, Mode::HangWriteAt(0));
    let before: Vec<u32> = (0..2)
        .map(|i| s.fakes[i].arrived.load(Ordering::SeqCst))
        .collect();
    let w1 = s.write(0, 1);
    s.arrived(0, before[0] + 1).await;
    s.arrived(1, before[1] + 1).await;
    tokio::time::advance(TIMEOUT).await;
    assert!(finished(w1).await.is_err(), "no in-sync replica answered");
    // r0's node restarts before the next write: its floor cannot be raised.
    s.set(0, Mode::Restarted);
    s.set(1, Mode::Answer);
    finished(s.write(8192, 2))
        .await
        .expect("the write goes on with r1");
    let rec = s.record().await;
    assert_eq!(rec.in_sync(), vec!["r1".to_string()]);
    assert!(rec.left_at.contains_key("r0"), "{rec:?}");
    finished(s.write(16384, 3)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn one_fails_one_hangs_one_answers_both_leave_in_one_update() {
    let s = setup(3, None).await;
    s.set(0, Mode::Fail);
    s.set(1, Mode::Hang);
    let before = s.fakes[1].arrived.load(Ordering::SeqCst);
    let start = Instant::now();
    let w = s.write(1 << 20, 3);
    s.arrived(1, before + 1).await;
    settle_real_time().await;
    // The failure alone does not release the write: r1 has not answered yet.
    assert!(!w.is_finished());
    assert_eq!(s.record().await.in_sync().len(), 4);
    tokio::time::advance(TIMEOUT).await;
    finished(w).await.unwrap();
    assert_eq!(start.elapsed(), TIMEOUT);
    let rec = s.record().await;
    assert_eq!(rec.in_sync(), vec!["me".to_string(), "r2".to_string()]);
    assert!(rec.left_at.contains_key("r0") && rec.left_at.contains_key("r1"));
    assert_eq!(*s.fakes[2].writes.lock().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn writes_during_a_resync_reach_the_returning_replica_and_it_rejoins() {
    // r0 is out of sync (it was down); a resync starts catching it up.
    let s = setup(1, Some(vec!["me"])).await;
    finished(s.write(0, 1)).await.unwrap();
    assert_eq!(
        *s.fakes[0].writes.lock().unwrap(),
        0,
        "out of sync: no writes"
    );

    let io = s.io.clone();
    let from = tokio::task::spawn_blocking(move || io.catch_up("r0"))
        .await
        .unwrap();
    assert!(from > shoal_blockd::versions::first_version(7));
    finished(s.write(4096, 2)).await.unwrap();
    finished(s.write(8192, 3)).await.unwrap();
    assert_eq!(
        *s.fakes[0].writes.lock().unwrap(),
        2,
        "live writes during resync"
    );
    assert_eq!(
        s.record().await.in_sync(),
        vec!["me".to_string()],
        "not in sync before rejoin"
    );

    let io = s.io.clone();
    tokio::task::spawn_blocking(move || io.rejoin("r0", 8192))
        .await
        .unwrap()
        .unwrap();
    let rec = s.record().await;
    assert_eq!(rec.in_sync(), vec!["me".to_string(), "r0".to_string()]);
    assert_eq!(rec.resync_bytes["r0"], 8192);
    assert!(s.io.in_sync().contains("r0"));
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_replica_that_hangs_costs_one_timeout_and_never_degrades() {
    let s = setup(1, Some(vec!["me"])).await;
    let io = s.io.clone();
    tokio::task::spawn_blocking(move || io.catch_up("r0"))
        .await
        .unwrap();
    s.set(0, Mode::Hang);
    let before = s.fakes[0].arrived.load(Ordering::SeqCst);
    let start = Instant::now();
    let w = s.write(0, 4);
    s.arrived(0, before + 1).await;
    tokio::time::advance(TIMEOUT).await;
    finished(w).await.unwrap();
    assert_eq!(start.elapsed(), TIMEOUT);
    assert!(
        !s.io.is_catching_up("r0"),
        "its resync stops; it starts over later"
    );
    assert_eq!(
        s.record().await.in_sync(),
        vec!["me".to_string()],
        "in-sync set untouched"
    );
    // It missed a write, so it cannot rejoin.
    let io = s.io.clone();
    let err = tokio::task::spawn_blocking(move || io.rejoin("r0", 0))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("missed a write"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_epoch_change_during_a_hang_fails_the_write_and_fences() {
    let s = setup(1, None).await;
    s.set(0, Mode::Hang);
    let before = s.fakes[0].arrived.load(Ordering::SeqCst);
    let w = s.write(0, 5);
    s.arrived(0, before + 1).await;
    // While the write waits, another node takes the volume over with a newer epoch.
    let mut rec = s.record().await;
    rec.epoch = 8;
    rec.attached_node = Some("other".into());
    s.meta
        .put(&s.keys.volume(VOL), &records::encode(&rec))
        .await
        .unwrap();
    tokio::time::advance(TIMEOUT).await;
    let err = finished(w).await.unwrap_err();
    assert!(err.to_string().contains("no longer"), "{err}");
    // Nothing claims r0 left: the new coordinator decides about it.
    let rec = s.record().await;
    assert!(rec.in_sync().contains(&"r0".to_string()));
    assert!(rec.left_at.is_empty());
    // The fenced coordinator refuses at once, without waiting on anyone.
    s.set(0, Mode::Answer);
    let start = Instant::now();
    assert!(finished(s.write(0, 6)).await.is_err());
    assert_eq!(start.elapsed(), Duration::ZERO);
}
