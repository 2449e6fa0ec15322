//! A shared volume's coordinator cut off the network (not killed): it stops serving
//! before its role lease can run out, a successor starts only after that, and no host
//! holds a lock another host holds or reads a value older than one already written.
//! Real node processes in network namespaces, real etcd, real FUSE mounts.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_tests::{fcntl_lock, require_root, wait_until, Cluster};

fn read_counter(f: &mut fs::File) -> std::io::Result<u64> {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_string(&mut s)?;
    Ok(s.trim().parse().unwrap_or(0))
}

/// The counter as a fresh open on `mount` reads it.
fn read_fresh(mount: &Path) -> std::io::Result<u64> {
    read_counter(&mut fs::File::open(mount.join("counter"))?)
}

/// Increments the counter `n` times under an exclusive fcntl lock, retrying a lock
/// call the failover interrupts (as an application would); records every value it
/// wrote in `written` once the write returned.
fn increment_under_lock(path: PathBuf, n: u64, written: Arc<AtomicU64>) -> u64 {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut retries = 0;
    for _ in 0..n {
        while let Err(e) = fcntl_lock(&f, libc::F_WRLCK, true) {
            retries += 1;
            assert!(retries < 600, "the lock never came back: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let v = read_counter(&mut f).expect("read under the lock") + 1;
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(format!("{v:<12}").as_bytes())
            .expect("write under the lock");
        written.fetch_max(v, Ordering::SeqCst);
        fcntl_lock(&f, libc::F_UNLCK, false).expect("unlock");
    }
    retries
}

#[test]
fn a_cut_off_coordinator_stops_before_its_successor_starts() {
    coordinator_cut_off(Cluster::cut, Cluster::heal);
}

/// The coordinator loses only the metadata store: gossip still says it is alive, but it
/// cannot renew its role, so it stops serving, and the others take the volume over once
/// its role key has been gone for a whole lease.
#[test]
fn a_coordinator_cut_off_etcd_only_is_replaced_and_serves_nothing_stale() {
    coordinator_cut_off(Cluster::cut_store, Cluster::heal_store);
}

/// Node 0 coordinates a shared volume that hosts 1 and 2 increment a counter on under
/// fcntl locks while hosts 3 and 0 read it; `cut(node 0)` partway, then `heal`.
fn coordinator_cut_off(cut: fn(&Cluster, usize), heal: fn(&Cluster, usize)) {
    require_root!();
    let Some(c) = shoal_tests::netns_cluster(4) else {
        return;
    };
    // Node 0 coordinates (mounted first) and holds no replica; all four mount.
    let pinned = format!("{},{}", c.nodes[1].id(), c.nodes[2].id());
    c.shoal(
        0,
        &[
            "volume", "create", "ctr", "--size", "1G", "--repl", "2", "--shared", "--nodes",
            &pinned,
        ],
    )
    .expect_ok("create");
    let m: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = c.path().join(format!("mnt-{i}"));
            c.shoal(i, &["volume", "mount", "ctr", p.to_str().unwrap()])
                .expect_ok("mount");
            p
        })
        .collect();
    assert_eq!(
        c.json(1, &["volume", "inspect", "ctr"])["attached_node"],
        c.nodes[0].id()
    );
    fs::write(m[1].join("counter"), b"0").unwrap();

    const EACH: u64 = 150;
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = [1, 2]
        .into_iter()
        .map(|h| {
            let (p, w) = (m[h].join("counter"), written.clone());
            std::thread::spawn(move || increment_under_lock(p, EACH, w))
        })
        .collect();
    // Readers: every value a read returns is at least the highest value whose write
    // had returned before the read started. Host 3 is on the majority side; host 0 is
    // the coordinator's own host, cut off with it.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = |host: usize| {
        let (mount, written, done, violations) = (
            m[host].clone(),
            written.clone(),
            done.clone(),
            violations.clone(),
        );
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut last = 0;
            while !done.load(Ordering::SeqCst) {
                let floor = written.load(Ordering::SeqCst);
                match read_fresh(&mount) {
                    Ok(v) => {
                        ok += 1;
                        if v < floor || v < last {
                            violations.lock().unwrap().push(format!(
                                "host {host} read {v} after {floor} was written (last read {last})"
                            ));
                        }
                        last = v;
                    }
                    Err(e) => {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("host {host}: read failed: {e}");
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    let readers = [reader(3), reader(0)];

    wait_until(Duration::from_secs(60), "increments under way", || {
        written.load(Ordering::SeqCst) >= 40
    });
    let cut_at = Instant::now();
    cut(&c, 0);
    // A successor serves the volume; the workers carry on there.
    wait_until(Duration::from_secs(120), "a new coordinator", || {
        let v = c.json(1, &["volume", "inspect", "ctr"]);
        !v["attached_node"].is_null() && v["attached_node"] != c.nodes[0].id().as_str()
    });
    eprintln!("taken over {:?} after the cut", cut_at.elapsed());
    let retries: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    eprintln!("lock retries during the failover: {retries:?}");
    // The cut-off host's mount could not have served anything newer meanwhile; heal and
    // it follows the successor.
    heal(&c, 0);
    wait_until(
        Duration::from_secs(60),
        "the healed host reads again",
        || read_fresh(&m[0]).is_ok_and(|v| v == 2 * EACH),
    );
    done.store(true, Ordering::SeqCst);
    for (r, host) in readers.into_iter().zip([3, 0]) {
        let (ok, failed) = r.join().unwrap();
        eprintln!("host {host}: {ok} reads, {failed} failed");
        assert!(ok > 0, "host {host} read something");
    }
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "{} stale reads, the first: {:?}",
        v.len(),
        &v[..v.len().min(5)]
    );
    for (i, mount) in m.iter().enumerate() {
        assert_eq!(
            read_fresh(mount).unwrap(),
            2 * EACH,
            "host {i}: no increment lost or doubled"
        );
    }
    shoal_tests::cleanup_mounts(&m[0]);
}
