//! A replica node that loses power (its page cache with it) loses the writes it
//! acknowledged but had not flushed. It must not count in sync again until a resync put
//! them back, and nothing acknowledged by an `fsync` may be lost. Real node processes,
//! etcd and FUSE; the power cut is the `lose-unsynced` failpoint (blockd/src/powerloss.rs),
//! or `lose-unsynced-data`, which tears regions apart (versions kept, data lost), or
//! `lose-unsynced-versions`, which tears them the other way (data kept, versions lost).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shoal_tests::{require_root, sha256_file, wait_until, Cluster, Opts};

const MIB: u64 = 1 << 20;

/// Runs `dd` (1 MiB blocks, no status) with `args`; returns what it wrote to stdout.
fn run_dd(args: &[String]) -> Vec<u8> {
    let out = Command::new("dd")
        .args(["bs=1M", "status=none"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes 4 MiB of `byte` at `at_mib` into the raw device with O_DIRECT (so the write
/// reaches the replicas before dd goes on), with an fsync at the end when `fsync`.
fn dd(dir: &Path, device: &str, byte: u8, at_mib: u64, fsync: bool) {
    let src = dir.join(format!("pattern-{byte}"));
    std::fs::write(&src, vec![byte; 4 * MIB as usize]).unwrap();
    let conv = if fsync { "notrunc,fsync" } else { "notrunc" };
    run_dd(&[
        format!("if={}", src.display()),
        format!("of={device}"),
        "count=4".into(),
        "oflag=direct".into(),
        format!("conv={conv}"),
        format!("seek={at_mib}"),
    ]);
}

/// Reads `count` MiB at `skip` MiB from the raw device with O_DIRECT.
fn dd_read(device: &str, skip: u64, count: u64) -> Vec<u8> {
    run_dd(&[
        format!("if={device}"),
        "iflag=direct".into(),
        format!("skip={skip}"),
        format!("count={count}"),
    ])
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

/// Three nodes, node 1 able to lose power; a raw volume `pl` with its replicas on nodes 1
/// and 2 (in that order), attached on node 0. Returns the device and the replica files.
fn setup() -> (Cluster, String, Vec<PathBuf>) {
    setup_with("lose-unsynced", 0)
}

/// [`setup`] with node 1's failpoint `failpoint`, the volume attached on node `on`.
fn setup_with(failpoint: &str, on: usize) -> (Cluster, String, Vec<PathBuf>) {
    setup_failpoints(&[(1, failpoint)], on)
}

/// [`setup`] with the failpoints `failpoints` (node, name), the volume attached on node
/// `on`.
fn setup_failpoints(failpoints: &[(usize, &str)], on: usize) -> (Cluster, String, Vec<PathBuf>) {
    let mut c = Cluster::start(
        3,
        Opts {
            // Long: a slow machine must not drop node 1 before the power cut.
            extra_args: vec!["--replica-timeout".into(), "10".into()],
            ..Opts::default()
        },
    );
    for &(i, failpoint) in failpoints {
        c.nodes[i]
            .env
            .push(("SHOAL_FAILPOINTS".into(), failpoint.into()));
        c.restart(i);
    }
    c.wait_all_online();
    let pinned = format!("{},{}", c.nodes[1].id(), c.nodes[2].id());
    c.shoal(
        0,
        &[
            "volume", "create", "pl", "--size", "128M", "--repl", "2", "--fs", "none", "--nodes",
            &pinned,
        ],
    )
    .expect_ok("create");
    let v = c.json(on, &["volume", "attach", "pl"]);
    let device = v["device_path"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    let imgs = c
        .nodes
        .iter()
        .map(|n| n.data_dir.join("pool/replicas").join(format!("{id}.img")))
        .collect();
    (c, device, imgs)
}

/// Writes A (fsynced) and B (acknowledged, not flushed), then cuts node 1's power: it
/// comes back... not yet: the caller restarts it.
fn write_then_cut_power(c: &mut Cluster, device: &str, imgs: &[PathBuf]) {
    dd(c.path(), device, b'a', 0, true);
    dd(c.path(), device, b'b', 8, false);
    assert_eq!(
        replica_bytes(&imgs[1], 8),
        vec![b'b'; 4],
        "B reached node 1"
    );
    cut_power(c, 1);
    assert_eq!(replica_bytes(&imgs[1], 0), vec![b'a'; 4], "A survived");
    assert_ne!(
        replica_bytes(&imgs[1], 8),
        vec![b'b'; 4],
        "the failpoint dropped the unsynced B"
    );
}

/// Sends node `i` the power cut and waits until it is down.
fn cut_power(c: &mut Cluster, i: usize) {
    c.signal(i, libc::SIGUSR2);
    let start = std::time::Instant::now();
    while c.nodes[i].running() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node {i} still up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.log(i).contains("power cut"), "{}", c.log(i));
}

fn all_in_sync(c: &Cluster) -> bool {
    let v = c.json(0, &["volume", "inspect", "pl"]);
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "in-sync")
}

#[test]
fn a_replica_that_lost_power_is_resynced_and_no_fsynced_write_is_lost() {
    require_root!();
    let (mut c, device, imgs) = setup();
    write_then_cut_power(&mut c, &device, &imgs);
    // Written during the outage: node 1 leaves the in-sync set.
    dd(c.path(), &device, b'c', 16, true);
    wait_until(Duration::from_secs(30), "the volume degraded", || {
        c.json(0, &["volume", "inspect", "pl"])["degraded"] == true
    });
    c.restart(1);
    wait_until(Duration::from_secs(90), "node 1 resynced", || {
        all_in_sync(&c)
    });
    c.shoal(0, &["volume", "detach", "pl"]).expect_ok("detach");
    // Node 1 got B back (and C), and holds exactly what node 2 holds.
    assert_eq!(replica_bytes(&imgs[1], 8), vec![b'b'; 4], "B recopied");
    assert_eq!(replica_bytes(&imgs[1], 16), vec![b'c'; 4], "C copied");
    assert_eq!(
        sha256_file(&imgs[1]),
        sha256_file(&imgs[2]),
        "replicas equal"
    );
}

#[test]
fn a_read_is_never_served_by_a_replica_that_lost_power() {
    require_root!();
    let (mut c, device, imgs) = setup();
    let v = c.json(0, &["volume", "inspect", "pl"]);
    assert_eq!(
        v["replicas"][0]["node"],
        c.nodes[1].id(),
        "node 1 is asked first: {v}"
    );
    write_then_cut_power(&mut c, &device, &imgs);
    // Back before anything was written: the first thing it is asked is a read of B.
    c.restart(1);
    c.wait_all_online();
    // Reads of data the coordinator does not cache (64 MiB: they also evict B from its
    // read cache): they must not be served by node 1 (the first may find node 1's old
    // connection broken and go to node 2; the next reach node 1, which must refuse).
    for _ in 0..3 {
        dd_read(&device, 64, 64);
        std::thread::sleep(Duration::from_millis(300));
    }
    let got = dd_read(&device, 8, 4);
    assert!(
        got.len() == 4 * MIB as usize && got.iter().all(|b| *b == b'b'),
        "a read returned what node 1 lost instead of B"
    );
    // Node 1 left the in-sync set for it, and its resync brings B back.
    wait_until(Duration::from_secs(90), "node 1 resynced", || {
        all_in_sync(&c)
    });
    c.shoal(0, &["volume", "detach", "pl"]).expect_ok("detach");
    assert_eq!(replica_bytes(&imgs[1], 8), vec![b'b'; 4], "B recopied");
    assert_eq!(
        sha256_file(&imgs[1]),
        sha256_file(&imgs[2]),
        "replicas equal"
    );
    assert!(
        c.log(0).contains("replica node restarted"),
        "node 1 was taken out for the read"
    );
}

/// The coordinator's own node loses power with its versions written back but not its
/// data (a torn region: its version file claims B, its data file does not hold it). When
/// it attaches the volume again it must not count its own replica in sync (it would win
/// the tie with node 2 and serve, or copy, what it lost): reads return B, and a resync
/// brings B back to it.
#[test]
fn a_torn_replica_of_a_coordinator_that_lost_power_is_not_trusted_at_takeover() {
    require_root!();
    let (mut c, device, imgs) = setup_with("lose-unsynced-data", 1);
    write_then_cut_power(&mut c, &device, &imgs);
    c.restart(1);
    c.wait_all_online();
    let v = c.json(1, &["volume", "attach", "pl"]);
    let device = v["device_path"].as_str().unwrap().to_string();
    let got = dd_read(&device, 8, 4);
    assert!(
        got.len() == 4 * MIB as usize && got.iter().all(|b| *b == b'b'),
        "a read after the takeover returned what the torn replica lost instead of B"
    );
    assert_eq!(dd_read(&device, 0, 4), vec![b'a'; 4 * MIB as usize], "A");
    assert!(
        c.log(1)
            .contains("it leaves the in-sync set and is resynced"),
        "node 1 took its replica out: {}",
        c.log(1)
    );
    wait_until(Duration::from_secs(90), "node 1 resynced", || {
        all_in_sync(&c)
    });
    c.shoal(1, &["volume", "detach", "pl"]).expect_ok("detach");
    assert_eq!(replica_bytes(&imgs[1], 8), vec![b'b'; 4], "B recopied");
    assert_eq!(
        sha256_file(&imgs[1]),
        sha256_file(&imgs[2]),
        "replicas equal"
    );
}

/// Both replicas lose power at once, torn the other way on node 1: the kernel had
/// written B's data back but not its versions, so node 1's files hold B under the
/// versions of before; node 2 lost B altogether. Both rebooted, so both stay in sync at
/// the takeover, and by versions alone they look equal. The activity log names the
/// extent B was written into: its regions are compared, and the replicas end
/// byte-identical (B or not B, the same on both), with the fsynced A on both.
#[test]
fn replicas_torn_apart_by_a_power_cut_of_every_node_end_equal() {
    require_root!();
    let (mut c, device, imgs) =
        setup_failpoints(&[(1, "lose-unsynced-versions"), (2, "lose-unsynced")], 1);
    dd(c.path(), &device, b'a', 0, true);
    dd(c.path(), &device, b'b', 8, false);
    for i in [1, 2] {
        assert_eq!(
            replica_bytes(&imgs[i], 8),
            vec![b'b'; 4],
            "B reached node {i}"
        );
    }
    cut_power(&mut c, 1);
    cut_power(&mut c, 2);
    assert_eq!(
        replica_bytes(&imgs[1], 8),
        vec![b'b'; 4],
        "node 1 kept B's data"
    );
    assert_ne!(replica_bytes(&imgs[2], 8), vec![b'b'; 4], "node 2 lost B");
    c.restart(1);
    c.restart(2);
    c.wait_all_online();
    let v = c.json(1, &["volume", "attach", "pl"]);
    let device = v["device_path"].as_str().unwrap().to_string();
    assert_eq!(dd_read(&device, 0, 4), vec![b'a'; 4 * MIB as usize], "A");
    let first = dd_read(&device, 8, 4);
    let log = c.log(1);
    let raised = log
        .lines()
        .filter_map(|l| l.split("raised=").nth(1))
        .filter_map(|r| {
            r.split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max();
    assert!(
        raised.is_some_and(|n| n >= 8),
        "the reboot raised node 1's logged regions (A's and B's): {log}"
    );
    c.shoal(1, &["volume", "detach", "pl"]).expect_ok("detach");
    assert_eq!(replica_bytes(&imgs[1], 0), vec![b'a'; 4], "A on node 1");
    assert_eq!(replica_bytes(&imgs[2], 0), vec![b'a'; 4], "A on node 2");
    assert_eq!(
        sha256_file(&imgs[1]),
        sha256_file(&imgs[2]),
        "replicas equal after the takeover"
    );
    // What was read is what both hold.
    let held: Vec<u8> = (8..12).map(|m| first[((m - 8) * MIB) as usize]).collect();
    assert_eq!(
        replica_bytes(&imgs[2], 8),
        held,
        "the read matched the replicas"
    );
}
