//! Synchronous replication under real faults: `kill -9` and `SIGSTOP` of replica nodes
//! while a writer streams through an ext4 volume, then incremental resync.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_tests::{require_root, sha256_file, wait_until, Cluster, Opts};

const MIB: usize = 1 << 20;

fn node_index(c: &Cluster, id: &str) -> usize {
    (0..c.nodes.len()).find(|&i| c.nodes[i].id() == id).unwrap()
}

/// What the last finished resync of `node`'s replica copied, from `inspect`.
fn last_resync_bytes(v: &Value, node: &str) -> u64 {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .unwrap()["last_resync_bytes"]
        .as_u64()
        .unwrap()
}

fn replica_states(v: &Value) -> Vec<(String, String)> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Streams 1 MiB blocks (fsync every 8) into `path` until `stop`; returns the data's
/// SHA-256, the bytes written, and the longest single write+fsync stall.
fn writer(
    path: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(String, u64, Duration)> {
    std::thread::spawn(move || {
        use rand::RngExt;
        use sha2::{Digest, Sha256};
        let mut f = std::fs::File::create(&path).unwrap();
        let mut h = Sha256::new();
        let mut rng = rand::rng();
        let mut buf = vec![0u8; MIB];
        let mut written = 0u64;
        let mut worst = Duration::ZERO;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            rng.fill(&mut buf[..]);
            let t = Instant::now();
            f.write_all(&buf).expect("the writer sees no error");
            i += 1;
            if i % 8 == 0 {
                f.sync_data().expect("fsync sees no error");
            }
            worst = worst.max(t.elapsed());
            h.update(&buf);
            written += MIB as u64;
            std::thread::sleep(Duration::from_millis(5));
        }
        f.sync_all().unwrap();
        (hex::encode(h.finalize()), written, worst)
    })
}

/// SHA-256 of each node's replica file of a volume.
fn replica_sums(c: &Cluster, volume_id: &str, nodes: &[usize]) -> Vec<String> {
    nodes
        .iter()
        .map(|&i| {
            let img = c.nodes[i]
                .data_dir
                .join("pool/replicas")
                .join(format!("{volume_id}.img"));
            sha256_file(&img)
        })
        .collect()
}

fn setup(repl: u32) -> (Cluster, String, Vec<usize>, usize, PathBuf) {
    let c = Cluster::start(
        3,
        Opts {
            extra_args: vec!["--replica-timeout".into(), "2".into()],
            ..Opts::default()
        },
    );
    let v = c.json(
        0,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "512M",
            "--repl",
            &repl.to_string(),
            "--fs",
            "ext4",
        ],
    );
    let id = v["id"].as_str().unwrap().to_string();
    let holders: Vec<usize> = replica_states(&v)
        .iter()
        .map(|(n, _)| node_index(&c, n))
        .collect();
    // Attach on a replica holder: the coordinator survives the fault we inject elsewhere.
    let coord = holders[0];
    let mnt = c.path().join("mnt");
    c.shoal(coord, &["volume", "mount", "db", mnt.to_str().unwrap()])
        .expect_ok("mount");
    (c, id, holders, coord, mnt)
}

fn all_in_sync(c: &Cluster, asker: usize) -> bool {
    let v = c.json(asker, &["volume", "inspect", "db"]);
    replica_states(&v).iter().all(|(_, s)| s == "in-sync")
}

fn check_converged(
    c: &mut Cluster,
    id: &str,
    holders: &[usize],
    coord: usize,
    mnt: &Path,
    sum: &str,
) {
    assert_eq!(
        sha256_file(&mnt.join("stream")),
        sum,
        "data read back through ext4"
    );
    c.shoal(coord, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(coord, &["volume", "detach", "db"])
        .expect_ok("detach");
    let sums = replica_sums(c, id, holders);
    assert!(
        sums.windows(2).all(|w| w[0] == w[1]),
        "replicas differ: {sums:?}"
    );
}

#[test]
fn killed_replica_is_dropped_then_resynced_incrementally() {
    require_root!();
    let (mut c, id, holders, coord, mnt) = setup(2);
    let victim = holders[1];
    let victim_id = c.nodes[victim].id();
    // Some data before the fault: it must not be copied again by the resync.
    let before = mnt.join("before");
    shoal_tests::write_random_file(&before, 64);

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(mnt.join("stream"), stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    c.kill(victim);
    wait_until(Duration::from_secs(20), "volume degraded", || {
        let v = c.json(coord, &["volume", "inspect", "db"]);
        v["degraded"] == true
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (sum, written, worst) = w.join().expect("writer saw no error");
    eprintln!("written {written} bytes, worst stall {worst:?}");
    // Out of the in-sync set at once; shown offline once gossip declares the node dead.
    wait_until(
        Duration::from_secs(10),
        "dead replica shown offline",
        || {
            let v = c.json(coord, &["volume", "inspect", "db"]);
            replica_states(&v).contains(&(victim_id.clone(), "offline".into()))
        },
    );

    c.restart(victim);
    wait_until(Duration::from_secs(60), "replica back in sync", || {
        all_in_sync(&c, coord)
    });
    let v = c.json(coord, &["volume", "inspect", "db"]);
    let moved = last_resync_bytes(&v, &victim_id);
    eprintln!("resync moved {moved} bytes");
    assert!(moved > 0, "something was copied");
    // Incremental: at most what was written during the outage (plus region rounding and
    // ext4 metadata), far less than the volume, and without the 64 MiB written before.
    assert!(
        moved < 512 * MIB as u64 / 2,
        "resync copied {moved} bytes: not incremental"
    );
    assert!(
        moved <= written + 48 * MIB as u64,
        "moved {moved} > written {written} + slack"
    );
    check_converged(&mut c, &id, &holders, coord, &mnt, &sum);
}

#[test]
fn a_detached_volumes_returning_replica_is_caught_up_without_an_attach() {
    require_root!();
    let (mut c, id, holders, coord, mnt) = setup(2);
    let victim = holders[1];
    let victim_id = c.nodes[victim].id();
    let before = shoal_tests::write_random_file(&mnt.join("before"), 64);
    c.kill(victim);
    // Written while the replica is away (the volume goes on, degraded).
    let during = shoal_tests::write_random_file(&mnt.join("during"), 24);
    wait_until(Duration::from_secs(20), "volume degraded", || {
        c.json(coord, &["volume", "inspect", "db"])["degraded"] == true
    });
    c.shoal(coord, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(coord, &["volume", "detach", "db"])
        .expect_ok("detach");
    let epoch_detached = c.json(coord, &["volume", "inspect", "db"])["epoch"]
        .as_u64()
        .unwrap();

    // Nobody attaches it: the replica is caught up anyway.
    c.restart(victim);
    wait_until(
        Duration::from_secs(60),
        "detached volume's replica back in sync",
        || all_in_sync(&c, coord),
    );
    let v = c.json(coord, &["volume", "inspect", "db"]);
    assert!(
        v["attached_node"].as_str().unwrap_or("").is_empty(),
        "still detached: {v}"
    );
    assert!(
        v["epoch"].as_u64().unwrap() > epoch_detached,
        "the upkeep claimed the volume with a new epoch"
    );
    let moved = last_resync_bytes(&v, &victim_id);
    eprintln!("resync of the detached volume moved {moved} bytes");
    assert!(
        moved >= 24 * MIB as u64,
        "the outage's writes were copied: {moved}"
    );
    assert!(
        moved < 64 * MIB as u64,
        "incremental: the 64 MiB written before the outage were not copied again: {moved}"
    );
    let sums = replica_sums(&c, &id, &holders);
    assert_eq!(sums[0], sums[1], "replicas identical");

    // And the volume is whole when attached next, on the replica that was away.
    let mnt2 = c.path().join("mnt2");
    c.shoal(victim, &["volume", "mount", "db", mnt2.to_str().unwrap()])
        .expect_ok("mount on the caught-up node");
    assert_eq!(sha256_file(&mnt2.join("before")), before);
    assert_eq!(sha256_file(&mnt2.join("during")), during);
    c.shoal(victim, &["volume", "unmount", mnt2.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(victim, &["volume", "detach", "db"])
        .expect_ok("detach");
}

#[test]
fn hung_replica_stalls_writes_at_most_the_timeout() {
    require_root!();
    let (mut c, id, holders, coord, mnt) = setup(3);
    let victim = holders[2];
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(mnt.join("stream"), stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    c.pause(victim);
    wait_until(Duration::from_secs(20), "volume degraded", || {
        c.json(coord, &["volume", "inspect", "db"])["degraded"] == true
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (sum, written, worst) = w.join().expect("writer saw no error");
    eprintln!("written {written} bytes, worst stall {worst:?}");
    // The replica timeout is 2 s; allow for the loop device and ext4 above it.
    assert!(worst < Duration::from_secs(15), "a write stalled {worst:?}");
    c.resume(victim);
    wait_until(Duration::from_secs(60), "replica back in sync", || {
        all_in_sync(&c, coord)
    });
    check_converged(&mut c, &id, &holders, coord, &mnt, &sum);
}

#[test]
fn writes_fail_rather_than_ack_when_the_failure_cannot_be_recorded() {
    require_root!();
    let (mut c, _id, holders, coord, mnt) = setup(2);
    // Raw writes through the device, so ext4's own retries do not blur the result.
    let data = c.json(coord, &["volume", "inspect", "db"]);
    assert_eq!(data["coordinator"], c.nodes[coord].id());
    let file = mnt.join("f");
    shoal_tests::write_random_file(&file, 4);
    // etcd down and a replica dead: the write cannot be made safe, so it must fail.
    c.etcd.as_mut().unwrap().stop();
    c.kill(holders[1]);
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file)?;
        f.write_all(&vec![9u8; 4 * MIB])?;
        f.sync_all()
    })();
    assert!(
        res.is_err(),
        "an unrecordable degraded write was acknowledged"
    );
    c.etcd.as_mut().unwrap().restart();
}

#[test]
fn ha_update_adds_a_replica_online_and_removes_one() {
    require_root!();
    let c = Cluster::start(3, Opts::default());
    let v = c.json(
        0,
        &["volume", "create", "db", "--size", "256M", "--fs", "ext4"],
    );
    let id = v["id"].as_str().unwrap().to_string();
    let first = node_index(&c, replica_states(&v)[0].0.as_str());
    let mnt = c.path().join("mnt");
    c.shoal(first, &["volume", "mount", "db", mnt.to_str().unwrap()])
        .expect_ok("mount");
    let sum = shoal_tests::write_random_file(&mnt.join("data"), 32);

    c.shoal(first, &["volume", "ha-update", "db", "--repl", "3"])
        .expect_err("one at a time");
    c.shoal(first, &["volume", "ha-update", "db", "--repl", "1"])
        .expect_err("already has repl 1");
    let v = c.json(first, &["volume", "ha-update", "db", "--repl", "2"]);
    assert_eq!(v["repl"], 2);
    let added = replica_states(&v)
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| *n != c.nodes[first].id())
        .unwrap();
    // Writes go on while the new replica is built.
    let more = shoal_tests::write_random_file(&mnt.join("more"), 8);
    wait_until(Duration::from_secs(60), "new replica in sync", || {
        all_in_sync(&c, first)
    });
    let v = c.json(first, &["volume", "inspect", "db"]);
    let copied = last_resync_bytes(&v, &added);
    assert!(
        copied >= 32 * MIB as u64,
        "full copy of the written data: {copied}"
    );
    assert!(
        copied < 256 * MIB as u64,
        "thin: only written regions: {copied}"
    );
    assert_eq!(sha256_file(&mnt.join("data")), sum);
    assert_eq!(sha256_file(&mnt.join("more")), more);
    c.shoal(first, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(first, &["volume", "detach", "db"])
        .expect_ok("detach");
    let holders: Vec<usize> = vec![first, node_index(&c, &added)];
    let sums = replica_sums(&c, &id, &holders);
    assert_eq!(sums[0], sums[1], "the new replica equals the old one");

    // Lower again, naming the node: its replica file goes away.
    let v = c.json(
        0,
        &["volume", "ha-update", "db", "--repl", "1", "--node", &added],
    );
    assert_eq!(v["repl"], 1);
    assert_eq!(replica_states(&v).len(), 1);
    let img = c.nodes[holders[1]]
        .data_dir
        .join("pool/replicas")
        .join(format!("{id}.img"));
    wait_until(
        Duration::from_secs(40),
        "removed replica's space freed",
        || !img.exists(),
    );
}

#[test]
fn a_replica_on_a_node_gone_too_long_is_rebuilt_elsewhere() {
    require_root!();
    let mut c = Cluster::start(
        3,
        Opts {
            extra_args: vec![
                "--replica-timeout".into(),
                "2".into(),
                "--rebuild-after".into(),
                "3".into(),
            ],
            ..Opts::default()
        },
    );
    let pin = format!("{},{}", c.nodes[0].id(), c.nodes[1].id());
    let v = c.json(
        0,
        &[
            "volume", "create", "db", "--size", "128M", "--repl", "2", "--fs", "ext4", "--nodes",
            &pin,
        ],
    );
    let id = v["id"].as_str().unwrap().to_string();
    let mnt = c.path().join("mnt");
    c.shoal(0, &["volume", "mount", "db", mnt.to_str().unwrap()])
        .expect_ok("mount");
    let sum = shoal_tests::write_random_file(&mnt.join("data"), 16);
    c.kill(1);
    let spare = c.nodes[2].id();
    wait_until(
        Duration::from_secs(60),
        "replica rebuilt on the spare node",
        || {
            let v = c.json(0, &["volume", "inspect", "db"]);
            let st = replica_states(&v);
            st.contains(&(spare.clone(), "in-sync".into()))
                && st.iter().all(|(_, s)| s == "in-sync")
        },
    );
    assert_eq!(sha256_file(&mnt.join("data")), sum);
    c.shoal(0, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(0, &["volume", "detach", "db"]).expect_ok("detach");
    let sums = replica_sums(&c, &id, &[0, 2]);
    assert_eq!(sums[0], sums[1]);
}

/// Node 0 coordinates a repl-2 raw volume on nodes 0 and 1 and writes A; `isolate` takes
/// it away (hung or cut off); once the others declare it dead, node 2 takes the volume over
/// and writes B; `restore` brings node 0 back, whose write of C must be refused. Returns the
/// volume id.
fn replaced_coordinator_is_fenced(c: &Cluster, isolate: impl Fn(), restore: impl Fn()) -> String {
    let pin = format!("{},{}", c.nodes[0].id(), c.nodes[1].id());
    let v = c.json(
        0,
        &[
            "volume", "create", "raw", "--size", "64M", "--repl", "2", "--nodes", &pin,
        ],
    );
    let id = v["id"].as_str().unwrap().to_string();
    let v = c.json(0, &["volume", "attach", "raw"]);
    let old_dev = PathBuf::from(v["device_path"].as_str().unwrap());
    // Each device is closed before its node may hang: closing a FUSE file waits for its
    // daemon, and every process this test spawns would close an inherited copy.
    let write_dev = |dev: &Path, byte: u8| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(dev)?;
        f.write_all(&vec![byte; MIB])?;
        f.sync_all()
    };
    write_dev(&old_dev, b'A').unwrap();
    // On a loaded machine the write may have outlasted the replica timeout and dropped
    // node 1 for a moment: the takeover needs it back in sync (it is the only copy left).
    let synced = || {
        let v = c.json(0, &["volume", "inspect", "raw"]);
        replica_states(&v).iter().all(|(_, s)| s == "in-sync")
    };
    let start = std::time::Instant::now();
    while !synced() {
        if start.elapsed() > Duration::from_secs(60) {
            let v = c.json(0, &["volume", "inspect", "raw"]);
            panic!(
                "node 1 not back in sync 60 s after the write: {v}\ncoordinator's log:\n{}",
                c.log(0)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    isolate();
    let dead = c.nodes[0].id();
    // The attaching node's own view: it takes the volume over only from a dead node.
    wait_until(
        Duration::from_secs(20),
        "isolated coordinator declared dead",
        || {
            [1, 2].iter().all(|&i| {
                c.states(i)
                    .iter()
                    .any(|(n, s)| *n == dead && s == "offline")
            })
        },
    );
    let v = c.json(2, &["volume", "attach", "raw"]);
    assert_eq!(v["coordinator"], c.nodes[2].id());
    assert!(
        v["epoch"].as_u64().unwrap() >= 2,
        "a takeover bumps the epoch: {v}"
    );
    let new_dev = PathBuf::from(v["device_path"].as_str().unwrap());
    write_dev(&new_dev, b'B').unwrap();
    // Back, the old coordinator still believes it serves the volume: refused, never acked.
    restore();
    assert!(
        write_dev(&old_dev, b'C').is_err(),
        "a replaced coordinator's write was acknowledged"
    );
    let data = std::fs::read(&new_dev).unwrap();
    assert!(
        data[..MIB].iter().all(|&b| b == b'B'),
        "new coordinator's data intact"
    );
    let img = c.nodes[1]
        .data_dir
        .join("pool/replicas")
        .join(format!("{id}.img"));
    let on_disk = std::fs::read(&img).unwrap();
    assert!(
        on_disk[..MIB].iter().all(|&b| b == b'B'),
        "in-sync replica holds B, not C"
    );
    id
}

#[test]
fn a_hung_coordinator_is_replaced_and_can_no_longer_write() {
    require_root!();
    let c = Cluster::start(
        3,
        Opts {
            extra_args: vec!["--replica-timeout".into(), "2".into()],
            ..Opts::default()
        },
    );
    replaced_coordinator_is_fenced(&c, || c.pause(0), || c.resume(0));
}

#[test]
fn a_coordinator_cut_off_the_network_is_replaced_and_fenced() {
    require_root!();
    let Some(c) = shoal_tests::netns_cluster(3) else {
        return;
    };
    let id = replaced_coordinator_is_fenced(&c, || c.cut(0), || c.heal(0));
    // The returning node's replica is resynced by the new coordinator: replicas converge.
    wait_until(
        Duration::from_secs(60),
        "old coordinator's replica back in sync",
        || {
            let v = c.json(2, &["volume", "inspect", "raw"]);
            replica_states(&v).iter().all(|(_, s)| s == "in-sync")
        },
    );
    c.shoal(2, &["volume", "detach", "raw"]).expect_ok("detach");
    let sums = replica_sums(&c, &id, &[0, 1]);
    assert_eq!(sums[0], sums[1], "replicas converged");
}
