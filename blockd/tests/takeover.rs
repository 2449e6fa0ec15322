//! A coordinator dies with a write in flight that reached one in-sync replica and not
//! the other; its successor opens the volume. Real pools (replica files and version
//! files in a temporary directory) behind the real block API on loopback, the embedded
//! metadata store. Checks takeover reconciliation: before the successor serves, both
//! replicas hold the same bytes and versions in the region of the unfinished write, and
//! only the regions at or above the completion watermark were copied (it, not the
//! volume, bounds the work).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_blockd::meta::{EmbeddedStore, MetaStore};
use shoal_blockd::peers::Peers;
use shoal_blockd::pool::Pool;
use shoal_blockd::records::{self, Keys, VolumeRecord};
use shoal_blockd::volume_io::{Replica, Target, VolumeIo};
use shoal_proto::block::block_server::BlockServer;

#[allow(dead_code)]
mod common;
#[path = "common/pool_replica.rs"]
mod pool_replica;
use pool_replica::PoolReplica;

const VOL: &str = "0123456789abcdef";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 << 20;
/// Where the unfinished write goes (region 20).
const HELD_AT: u64 = 20 * MIB;

struct Cluster {
    rt: tokio::runtime::Runtime,
    meta: MetaStore,
    keys: Keys,
    peers: Peers,
    /// The coordinator node's own pool (replica "me" when `local`).
    local: Arc<Pool>,
    /// Remote replicas by node name.
    remotes: Vec<(String, PoolReplica, String)>,
    _dir: tempfile::TempDir,
}

fn cluster(remotes: &[&str]) -> Cluster {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::Embedded(EmbeddedStore::open(&dir.path().join("meta.json")).unwrap());
    let local = Arc::new(Pool::open(&dir.path().join("pool-me"), Some(1 << 30)).unwrap());
    let mut served = Vec::new();
    for name in remotes {
        let pool =
            Arc::new(Pool::open(&dir.path().join(format!("pool-{name}")), Some(1 << 30)).unwrap());
        let replica = PoolReplica::new(pool);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = BlockServer::new(replica.clone());
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        served.push((name.to_string(), replica, addr));
    }
    Cluster {
        rt,
        meta,
        keys: Keys::new("t"),
        peers: Peers::new(&"00".repeat(32)),
        local,
        remotes: served,
        _dir: dir,
    }
}

impl Cluster {
    /// Attaches at `epoch` (the record says so) and opens the volume, as a takeover does.
    fn coordinator(&self, with_local: bool, epoch: u64) -> Arc<VolumeIo> {
        let mut replicas = Vec::new();
        if with_local {
            replicas.push(Replica {
                node: "me".into(),
                target: Target::Local,
            });
        }
        for (name, _, addr) in &self.remotes {
            let client = {
                let _g = self.rt.enter();
                self.peers.block(addr).unwrap()
            };
            replicas.push(Replica {
                node: name.clone(),
                target: Target::Remote(Box::new(client)),
            });
        }
        let names: Vec<String> = replicas.iter().map(|r| r.node.clone()).collect();
        let mut rec: VolumeRecord = common::volume_record(VOL, names.clone(), names, epoch);
        rec.size_bytes = SIZE;
        self.rt
            .block_on(
                self.meta
                    .put(&self.keys.volume(VOL), &records::encode(&rec)),
            )
            .unwrap();
        if with_local {
            common::held_before(&self.local, &rec);
        }
        let io = Arc::new(VolumeIo::new(
            &rec,
            "me".into(),
            self.local.clone(),
            replicas,
            self.meta.clone(),
            self.keys.clone(),
            Duration::from_secs(30),
            self.rt.handle().clone(),
        ));
        io.open().unwrap();
        io
    }

    fn pool_of(&self, node: &str) -> Arc<Pool> {
        if node == "me" {
            return self.local.clone();
        }
        self.remotes
            .iter()
            .find(|(n, _, _)| n == node)
            .map(|(_, r, _)| r.pool.clone())
            .unwrap()
    }

    fn replica(&self, node: &str) -> &PoolReplica {
        &self.remotes.iter().find(|(n, _, _)| n == node).unwrap().1
    }

    fn region(&self, node: &str, region: u64) -> (Vec<u8>, u64) {
        self.pool_of(node).read_region(VOL, SIZE, region).unwrap()
    }
}

/// Writes 8 regions that complete everywhere, then a write at `HELD_AT` that `holder`
/// holds while it reaches the others; returns the thread running it once it has.
fn die_with_a_write_in_flight(
    c: &Cluster,
    io: &Arc<VolumeIo>,
    holder: &str,
    has_it: &str,
) -> std::thread::JoinHandle<Result<(), shoal_blockd::error::Error>> {
    for r in 0..8u64 {
        io.write(r * MIB, &vec![0xA0 + r as u8; MIB as usize], false)
            .unwrap();
    }
    c.replica(holder)
        .hold_write_at
        .store(HELD_AT, Ordering::SeqCst);
    let io2 = io.clone();
    let writer = std::thread::spawn(move || io2.write(HELD_AT, &[0xBB; 65536], false));
    let t0 = Instant::now();
    loop {
        let got = c.pool_of(has_it).read(VOL, SIZE, HELD_AT, 4).unwrap();
        if c.replica(holder).held.load(Ordering::SeqCst) == 1 && got == vec![0xBB; 4] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the write never got under way"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    writer
}

#[test]
fn a_successor_on_the_same_node_copies_its_unfinished_write_to_the_replica_that_missed_it() {
    let c = cluster(&["r1"]);
    let old = c.coordinator(true, 3);
    let writer = die_with_a_write_in_flight(&c, &old, "r1", "me");
    assert_ne!(
        c.region("me", 20),
        c.region("r1", 20),
        "replicas differ before"
    );

    // The node restarts its coordinator (epoch 4) while the old one's write still hangs.
    let _new = c.coordinator(true, 4);
    let (mine, theirs) = (c.region("me", 20), c.region("r1", 20));
    assert_eq!(
        mine.0, theirs.0,
        "same bytes in the region of the unfinished write"
    );
    assert_eq!(mine.1, theirs.1, "same version there");
    assert_eq!(
        &theirs.0[..4],
        &[0xBB; 4],
        "the local replica's outcome won"
    );
    // The lowest watermark (r1's, sent with the last finished write) bounds what is
    // compared: that write's region and the unfinished one, not the six before them.
    assert_eq!(
        c.replica("r1").region_writes.load(Ordering::SeqCst),
        2,
        "only the regions written at or above the completion watermark were copied"
    );

    // The old coordinator's write, let go, fails: it was replaced.
    c.replica("r1").let_go();
    let err = writer.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("could not be recorded"), "{err}");
    assert_eq!(c.region("me", 20).0, c.region("r1", 20).0, "still equal");
}

#[test]
fn a_successor_elsewhere_copies_each_region_from_its_newest_holder() {
    let c = cluster(&["r1", "r2"]);
    // The coordinator holds no replica; r1 (the successor's preferred source: first by
    // id) misses the write, r2 has it, at a newer version.
    let old = c.coordinator(false, 5);
    let writer = die_with_a_write_in_flight(&c, &old, "r1", "r2");
    let _new = c.coordinator(false, 6);
    let (a, b) = (c.region("r1", 20), c.region("r2", 20));
    assert_eq!(a.0, b.0, "same bytes in the region of the unfinished write");
    assert_eq!(a.1, b.1, "same version there");
    assert_eq!(
        &a.0[..4],
        &[0xBB; 4],
        "the newer version was copied to r1, never the older one over r2"
    );
    // The last finished write's region (equal on both: the preferred source's copy goes
    // to r2) and the unfinished one (r2's goes to r1).
    assert_eq!(c.replica("r2").region_writes.load(Ordering::SeqCst), 1);
    assert_eq!(c.replica("r1").region_writes.load(Ordering::SeqCst), 1);
    for r in 0..8u64 {
        assert_eq!(
            c.region("r1", r).0[..4],
            [0xA0 + r as u8; 4],
            "acknowledged writes are kept"
        );
    }
    c.replica("r1").let_go();
    assert!(writer.join().unwrap().is_err());
}

#[test]
fn after_a_flush_with_nothing_in_flight_a_successor_copies_nothing() {
    let c = cluster(&["r1"]);
    let old = c.coordinator(true, 7);
    for r in 0..4u64 {
        old.write(r * MIB, &vec![0x50 + r as u8; MIB as usize], false)
            .unwrap();
    }
    // Without the flush the last write's region is compared at the takeover: its version
    // is not below the watermark its own request carried.
    old.flush().unwrap();
    drop(old);
    let _new = c.coordinator(true, 8);
    assert_eq!(
        c.replica("r1").region_writes.load(Ordering::SeqCst),
        0,
        "nothing was in flight, so nothing is copied"
    );
    for r in 0..4u64 {
        assert_eq!(c.region("me", r), c.region("r1", r));
    }
}
