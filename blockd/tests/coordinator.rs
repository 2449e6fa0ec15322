//! The coordinator's write path against controllable replicas: an in-process block
//! service on loopback whose answers a test sets (answer, fail, hang), and the embedded
//! metadata store. Checks the outcome rules: a failed or hung replica leaves the in-sync
//! set in the store before the write is acknowledged; when that cannot be recorded (the
//! coordinator was replaced) the write fails and the coordinator fences itself; when
//! every in-sync replica fails the write fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_blockd::meta::{EmbeddedStore, MetaStore};
use shoal_blockd::peers::Peers;
use shoal_blockd::pool::Pool;
use shoal_blockd::records::{self, Keys, VolumeRecord};
use shoal_blockd::volume_io::{Replica, Target, VolumeIo};
use shoal_proto::block::block_server::BlockServer;

mod common;
use common::{FakeReplica, Mode};

struct Setup {
    rt: tokio::runtime::Runtime,
    io: Arc<VolumeIo>,
    meta: MetaStore,
    keys: Keys,
    fakes: Vec<FakeReplica>,
    _dir: tempfile::TempDir,
}

const VOL: &str = "0123456789abcdef";

/// A volume whose replicas are `local` (this node's pool, if true) and `remotes` fakes.
fn setup(local: bool, remotes: usize) -> Setup {
    setup_held(local, remotes, local)
}

/// `setup`, where `held` says whether the local replica's files are there (they were
/// made at the volume's first epoch) or were lost.
fn setup_held(local: bool, remotes: usize, held: bool) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::Embedded(EmbeddedStore::open(&dir.path().join("meta.json")).unwrap());
    let keys = Keys::new("t");
    let pool = Arc::new(Pool::open(&dir.path().join("pool"), Some(1 << 30)).unwrap());
    let peers = Peers::new(&"00".repeat(32));
    let mut replicas = Vec::new();
    let mut names = Vec::new();
    if local {
        replicas.push(Replica {
            node: "me".into(),
            target: Target::Local,
        });
        names.push("me".to_string());
    }
    let mut fakes = Vec::new();
    for i in 0..remotes {
        let fake = FakeReplica::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = BlockServer::new(fake.clone());
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let name = format!("r{i}");
        let client = {
            let _g = rt.enter();
            peers.block(&addr.to_string()).unwrap()
        };
        replicas.push(Replica {
            node: name.clone(),
            target: Target::Remote(Box::new(client)),
        });
        names.push(name);
        fakes.push(fake);
    }
    let rec = common::volume_record(VOL, names.clone(), names, 3);
    rt.block_on(meta.put(&keys.volume(VOL), &records::encode(&rec)))
        .unwrap();
    if held {
        common::held_before(&pool, &rec);
    }
    let io = Arc::new(VolumeIo::new(
        &rec,
        "me".into(),
        pool,
        replicas,
        meta.clone(),
        keys.clone(),
        Duration::from_millis(300),
        rt.handle().clone(),
    ));
    io.open().unwrap();
    Setup {
        rt,
        io,
        meta,
        keys,
        fakes,
        _dir: dir,
    }
}

impl Setup {
    fn record(&self) -> VolumeRecord {
        let kv = self
            .rt
            .block_on(self.meta.get(&self.keys.volume(VOL)))
            .unwrap()
            .unwrap();
        records::decode(&kv.key, &kv.value).unwrap()
    }

    fn set(&self, i: usize, m: Mode) {
        *self.fakes[i].mode.lock().unwrap() = m;
    }
}

#[test]
fn every_in_sync_replica_gets_the_write() {
    let s = setup(true, 2);
    s.io.write(0, &[1u8; 4096], false).unwrap();
    s.io.flush().unwrap();
    assert_eq!(*s.fakes[0].writes.lock().unwrap(), 1);
    assert_eq!(*s.fakes[1].writes.lock().unwrap(), 1);
    assert_eq!(s.record().in_sync().len(), 3);
    assert_eq!(
        s.io.read(0, 4).unwrap(),
        vec![1u8; 4],
        "read from the local replica"
    );
}

#[test]
fn a_failed_replica_leaves_the_in_sync_set_before_the_ack() {
    let s = setup(true, 2);
    s.io.write(0, &[1u8; 4096], false).unwrap();
    s.io.flush().unwrap();
    let flushed = s.io.next_version() - 1;
    s.io.write(4096, &[1u8; 4096], false).unwrap();
    s.set(1, Mode::Fail);
    s.io.write(8192, &[2u8; 4096], false).unwrap();
    // By the time write() returned, the store already says so.
    let rec = s.record();
    assert_eq!(rec.in_sync(), vec!["me".to_string(), "r0".to_string()]);
    // It holds what the flush made durable; the write it acknowledged after that may be
    // lost with its page cache (it stopped answering: a power cut?), so it is recopied.
    let at = rec.left_at["r1"];
    assert!(
        at >= shoal_blockd::versions::first_version(3) && at <= flushed,
        "left_at {at}, flushed up to {flushed}"
    );
    assert!(!s.io.in_sync().contains("r1"));
    // Later writes no longer wait for it (it got the two before it failed).
    s.io.write(0, &[3u8; 4096], false).unwrap();
    assert_eq!(*s.fakes[1].writes.lock().unwrap(), 2);
}

#[test]
fn an_in_sync_replica_whose_files_are_lost_leaves_the_set_holding_nothing() {
    // Epoch 3: the local replica must exist; its files are gone.
    let s = setup_held(true, 1, false);
    let rec = s.record();
    assert_eq!(rec.in_sync(), vec!["r0".to_string()]);
    assert_eq!(rec.left_at["me"], 0, "a full resync rebuilds it");
    assert!(!s.io.in_sync().contains("me"));
    // It was not made empty behind the set's back: the pool holds no file for it.
    let ids = s.io.pool().replica_ids().unwrap();
    assert!(ids.is_empty(), "{ids:?}");
}

#[test]
fn a_replica_whose_node_restarted_leaves_holding_only_what_was_flushed() {
    let s = setup(true, 1);
    s.io.write(0, &[1u8; 4096], false).unwrap();
    let flushed = s.io.next_version();
    s.io.flush().unwrap();
    // Not flushed: a power loss on r0's node may have taken it.
    s.io.write(8192, &[2u8; 4096], false).unwrap();
    s.set(0, Mode::Restarted);
    s.io.write(16384, &[3u8; 4096], false).unwrap();
    let rec = s.record();
    assert_eq!(rec.in_sync(), vec!["me".to_string()]);
    assert_eq!(
        rec.left_at["r0"],
        flushed - 1,
        "resynced from the last flush, so the unflushed write is copied again"
    );
}

#[test]
fn a_hung_replica_costs_the_writer_one_timeout() {
    let s = setup(true, 1);
    s.set(0, Mode::Hang);
    let t = Instant::now();
    s.io.write(0, &[1u8; 4096], false).unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "waited for the replica: {took:?}"
    );
    assert!(!s.record().in_sync().contains(&"r0".to_string()));
    let t = Instant::now();
    s.io.write(0, &[1u8; 4096], false).unwrap();
    assert!(t.elapsed() < Duration::from_millis(300), "no second wait");
}

#[test]
fn a_replaced_coordinator_cannot_degrade_and_fences_itself() {
    let s = setup(true, 1);
    // Another node attached the volume meanwhile: the record carries a newer epoch.
    let mut rec = s.record();
    rec.epoch = 4;
    rec.attached_node = Some("other".into());
    s.rt.block_on(s.meta.put(&s.keys.volume(VOL), &records::encode(&rec)))
        .unwrap();
    s.set(0, Mode::Fail);
    let err = s.io.write(0, &[1u8; 4096], false).unwrap_err();
    assert!(err.to_string().contains("no longer"), "{err}");
    // The failed replica is still in sync in the store: nothing was acknowledged without it.
    assert!(s.record().in_sync().contains(&"r0".to_string()));
    // And this coordinator now refuses everything.
    s.set(0, Mode::Answer);
    assert!(s.io.write(0, &[1u8; 4096], false).is_err());
    assert!(s.io.read(0, 4096).is_err());
}

#[test]
fn when_every_in_sync_replica_fails_the_write_fails() {
    let s = setup(false, 2);
    s.set(0, Mode::Fail);
    s.set(1, Mode::Fail);
    assert!(s.io.write(0, &[1u8; 4096], false).is_err());
    assert_eq!(
        s.record().in_sync().len(),
        2,
        "nothing recorded for a failed write"
    );
}

#[test]
fn remote_reads_are_cached_and_the_cache_follows_writes() {
    let s = setup(false, 1);
    assert_eq!(s.io.read(0, 4096).unwrap(), vec![0u8; 4096]);
    s.io.write(0, &[9u8; 4096], false).unwrap();
    s.set(0, Mode::Fail);
    // Served from the write-through cache although the replica now fails reads.
    assert_eq!(s.io.read(0, 4096).unwrap(), vec![9u8; 4096]);
    assert!(
        s.io.read(1 << 20, 4096).is_err(),
        "an uncached range needs the replica"
    );
}
