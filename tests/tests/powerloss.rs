//! A replica node that loses power (its page cache with it) loses the writes it
//! acknowledged but had not flushed. It must not count in sync again until a resync put
//! them back, and nothing acknowledged by an `fsync` may be lost. Real node processes,
//! etcd and FUSE; the power cut is the `lose-unsynced` failpoint (blockd/src/powerloss.rs).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shoal_tests::{require_root, sha256_file, wait_until, Cluster, Opts};

const MIB: u64 = 1 << 20;

/// Writes 4 MiB of `byte` at `at_mib` into the raw device with O_DIRECT (so the write
/// reaches the replicas before dd goes on), with an fsync at the end when `fsync`.
fn dd(dir: &Path, device: &str, byte: u8, at_mib: u64, fsync: bool) {
    let src = dir.join(format!("pattern-{byte}"));
    std::fs::write(&src, vec![byte; 4 * MIB as usize]).unwrap();
    let conv = if fsync {
        "conv=notrunc,fsync"
    } else {
        "conv=notrunc"
    };
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={device}"))
        .args(["bs=1M", "count=4", "oflag=direct", conv, "status=none"])
        .arg(format!("seek={at_mib}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first byte of each MiB of a replica file in `[at_mib, at_mib + 4)`.
fn replica_bytes(img: &Path, at_mib: u64) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    (at_mib..at_mib + 4)
        .map(|m| {
            let mut b = [0u8; 1];
            let n = f.read_at(&mut b, m * MIB).unwrap();
            if n == 0 {
                0
            } else {
                b[0]
            }
        })
        .collect()
}

#[test]
fn a_replica_that_lost_power_is_resynced_and_no_fsynced_write_is_lost() {
    require_root!();
    let mut c = Cluster::start(
        3,
        Opts {
            extra_args: vec!["--replica-timeout".into(), "2".into()],
            ..Opts::default()
        },
    );
    // Node 1's pool can lose power.
    c.nodes[1]
        .env
        .push(("SHOAL_FAILPOINTS".into(), "lose-unsynced".into()));
    c.restart(1);
    c.wait_all_online();
    let pinned = format!("{},{}", c.nodes[1].id(), c.nodes[2].id());
    c.shoal(
        0,
        &[
            "volume", "create", "pl", "--size", "64M", "--repl", "2", "--fs", "none", "--nodes",
            &pinned,
        ],
    )
    .expect_ok("create");
    let v = c.json(0, &["volume", "attach", "pl"]);
    let device = v["device_path"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    let imgs: Vec<_> = c
        .nodes
        .iter()
        .map(|n| n.data_dir.join("pool/replicas").join(format!("{id}.img")))
        .collect();
    let img = |i: usize| imgs[i].clone();

    // A is made durable by an fsync; B is acknowledged by both replicas, never flushed.
    dd(c.path(), &device, b'a', 0, true);
    dd(c.path(), &device, b'b', 8, false);
    assert_eq!(replica_bytes(&img(1), 8), vec![b'b'; 4], "B reached node 1");

    // Power cut on node 1: what it had not synced is gone.
    c.signal(1, libc::SIGUSR2);
    let start = std::time::Instant::now();
    while c.nodes[1].running() {
        assert!(start.elapsed() < Duration::from_secs(20), "node 1 still up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.log(1).contains("power cut"), "{}", c.log(1));
    assert_eq!(replica_bytes(&img(1), 0), vec![b'a'; 4], "A survived");
    assert_ne!(
        replica_bytes(&img(1), 8),
        vec![b'b'; 4],
        "the failpoint dropped the unsynced B"
    );

    // Written during the outage: node 1 leaves the in-sync set.
    dd(c.path(), &device, b'c', 16, true);
    wait_until(Duration::from_secs(30), "the volume degraded", || {
        c.json(0, &["volume", "inspect", "pl"])["degraded"] == true
    });
    c.restart(1);
    wait_until(Duration::from_secs(90), "node 1 resynced", || {
        let v = c.json(0, &["volume", "inspect", "pl"]);
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "in-sync")
    });
    c.shoal(0, &["volume", "detach", "pl"]).expect_ok("detach");
    // Node 1 got B back (and C), and holds exactly what node 2 holds.
    assert_eq!(replica_bytes(&img(1), 8), vec![b'b'; 4], "B recopied");
    assert_eq!(replica_bytes(&img(1), 16), vec![b'c'; 4], "C copied");
    assert_eq!(sha256_file(&img(1)), sha256_file(&img(2)), "replicas equal");
}
