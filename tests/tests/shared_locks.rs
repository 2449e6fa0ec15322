//! Shared volumes: POSIX and flock locks across hosts (exclusion, blocked waiters, dead
//! holders, a failover), and SQLite used from two hosts at once.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use shoal_tests::shared_vols::*;
use shoal_tests::{fcntl_lock, require_root, Cluster, Opts};

/// Adds one to the number at the start of `f`.
fn increment(f: &mut fs::File) {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    let n: u64 = s.trim().parse().unwrap_or(0);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(format!("{:<12}", n + 1).as_bytes()).unwrap();
}

fn flock(f: &fs::File, op: i32) {
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op) }, 0, "flock");
}

/// Two hosts each add 1000 to one counter file under a lock: no update may be lost.
fn counter_under(lock: fn(&fs::File), unlock: fn(&fs::File), name: &str) {
    let (_c, m) = mounted_everywhere(name);
    fs::write(m[0].join("counter"), b"0").unwrap();
    let workers: Vec<_> = (0..2)
        .map(|h| {
            let p = m[h].join("counter");
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .unwrap();
                for _ in 0..1000 {
                    lock(&f);
                    increment(&mut f);
                    unlock(&f);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let v = fs::read_to_string(m[2].join("counter")).unwrap();
    assert_eq!(v.trim(), "2000", "lost updates");
}

#[test]
fn fcntl_locks_exclude_across_hosts() {
    require_root!();
    counter_under(
        |f| fcntl_lock(f, libc::F_WRLCK, true).unwrap(),
        |f| fcntl_lock(f, libc::F_UNLCK, false).unwrap(),
        "ctr-fcntl",
    );
}

#[test]
fn flock_excludes_across_hosts() {
    require_root!();
    counter_under(
        |f| flock(f, libc::LOCK_EX),
        |f| flock(f, libc::LOCK_UN),
        "ctr-flock",
    );
}

#[test]
fn a_blocked_lock_wakes_on_unlock_and_a_dead_hosts_lock_expires() {
    require_root!();
    let mut c = Cluster::start(
        3,
        Opts {
            extra_args: vec!["--session-lease".into(), "2".into()],
            ..Default::default()
        },
    );
    c.shoal(0, &["volume", "create", "lk", "--size", "1G", "--shared"])
        .expect_ok("create");
    let m: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = c.path().join(format!("mnt-{i}"));
            c.shoal(i, &["volume", "mount", "lk", p.to_str().unwrap()])
                .expect_ok("mount");
            p
        })
        .collect();
    let coordinator = c.json(0, &["volume", "inspect", "lk"])["attached_node"]
        .as_str()
        .unwrap()
        .to_string();
    let coord = (0..3).find(|&i| c.nodes[i].id() == coordinator).unwrap();
    let (a, b) = ((coord + 1) % 3, (coord + 2) % 3);
    fs::write(m[a].join("f"), b"x").unwrap();

    // A holds a write lock; B's non-blocking attempt fails, its F_GETLK sees A's lock.
    let fa = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[a].join("f"))
        .unwrap();
    fcntl_lock(&fa, libc::F_WRLCK, false).unwrap();
    let fb = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[b].join("f"))
        .unwrap();
    let err = fcntl_lock(&fb, libc::F_WRLCK, false).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "{err}"
    );
    // B blocks; A's unlock wakes it.
    let waiter = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        fcntl_lock(&fb, libc::F_WRLCK, true).unwrap();
        (t.elapsed(), fb)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!waiter.is_finished(), "B got the lock while A held it");
    fcntl_lock(&fa, libc::F_UNLCK, false).unwrap();
    let (_, fb) = waiter.join().unwrap();
    // Now B holds it, and B's host dies without unlocking: after the session lease the
    // coordinator frees the lock; a live host's lock was never broken before that.
    std::mem::forget(fb);
    assert!(fcntl_lock(&fa, libc::F_WRLCK, false).is_err(), "B holds it");
    let v = c.json(a, &["volume", "inspect", "lk"]);
    let b_session = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == c.nodes[b].id())
        .cloned()
        .unwrap();
    assert_eq!(b_session["locks"], 1, "{v}");
    c.kill(b);
    shoal_tests::wait_until(
        std::time::Duration::from_secs(20),
        "the dead host's lock to be released",
        || fcntl_lock(&fa, libc::F_WRLCK, false).is_ok(),
    );
}

/// Runs an SQL script with the sqlite3 shell on `root/app.db`; its output, trimmed.
/// Panics on any error message.
fn sql(root: &Path, script: &str) -> String {
    let mut child = std::process::Command::new("sqlite3")
        .arg(root.join("app.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "sqlite3 on {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// SQLite with its default rollback journal (no WAL) from two hosts at once: its
/// `fcntl` locks and its re-reads of the file header must see the other host's commits.
#[test]
fn sqlite_used_from_two_hosts_at_once_stays_consistent() {
    require_root!();
    if std::process::Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: needs sqlite3 (apt-get install sqlite3)");
        return;
    }
    let (_c, m) = mounted_everywhere("sqlite");
    sql(
        &m[0],
        "PRAGMA journal_mode=DELETE;\
         CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER);\
         INSERT INTO counter VALUES (1, 0);\
         CREATE TABLE log(host INTEGER, i INTEGER, n INTEGER);",
    );
    let hosts: Vec<_> = (0..2)
        .map(|h| {
            let root = m[h].clone();
            std::thread::spawn(move || {
                // One sqlite3 process per host, 150 write transactions that read the
                // counter and write it back: a lost or torn commit shows in the totals.
                let mut script = String::from(".timeout 30000\n");
                for i in 0..150 {
                    script.push_str(&format!(
                        "BEGIN IMMEDIATE;\
                         INSERT INTO log SELECT {h}, {i}, n FROM counter WHERE id = 1;\
                         UPDATE counter SET n = n + 1 WHERE id = 1;\
                         COMMIT;\n"
                    ));
                }
                sql(&root, &script);
            })
        })
        .collect();
    for h in hosts {
        h.join().unwrap();
    }
    for root in [&m[0], &m[1], &m[2]] {
        assert_eq!(sql(root, "PRAGMA integrity_check;"), "ok");
        assert_eq!(sql(root, "SELECT n FROM counter;"), "300");
        // Every transaction saw the previous one's counter: the values read are 0..299,
        // each once.
        assert_eq!(
            sql(
                root,
                "SELECT count(DISTINCT n), min(n), max(n), count(*) FROM log;"
            ),
            "300|0|299|300"
        );
    }
}

/// A process that exits (or closes the file) holding an `fcntl` lock loses it, as on a
/// local filesystem: the kernel keeps no record of a FUSE mount's locks and sends no
/// unlock, only the close (FLUSH), which must release them at the coordinator.
#[test]
fn a_process_that_exits_holding_a_posix_lock_releases_it_for_other_hosts() {
    require_root!();
    let (_c, m) = mounted_everywhere("exitlock");
    fs::write(m[0].join("db"), b"").unwrap();
    // A child on host A locks and exits without unlocking.
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os,fcntl; fd=os.open('{}',os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); os._exit(0)",
            m[0].join("db").display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[1].join("db"))
        .unwrap();
    fcntl_lock(&f, libc::F_WRLCK, false).expect("the exited process's lock was released");
    fcntl_lock(&f, libc::F_UNLCK, false).unwrap();
    // Closing any descriptor of the file drops the process's locks too (POSIX).
    let a1 = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[0].join("db"))
        .unwrap();
    let a2 = fs::File::open(m[0].join("db")).unwrap();
    fcntl_lock(&a1, libc::F_WRLCK, false).unwrap();
    drop(a2);
    fcntl_lock(&f, libc::F_WRLCK, false).expect("released by the close of another descriptor");
    drop(a1);
}

#[test]
fn a_live_hosts_lock_survives_a_coordinator_failover() {
    require_root!();
    // The session lease (default 15 s) is also the new coordinator's grace period for
    // reclaims, and it must outlast the failover: a mount silent for longer than the
    // lease gives its locks up rather than reclaim them.
    let mut c = Cluster::start(3, Opts::default());
    let n1 = c.nodes[1].id();
    // Node 0 (no replica) coordinates; hosts 1 and 2 mount too.
    let m = coordinated_by_node_0(&c, "rl", 3);
    fs::write(m[1].join("f"), b"x").unwrap();
    let open = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    let fa = open(&m[1].join("f"));
    fcntl_lock(&fa, libc::F_WRLCK, false).unwrap();
    let fb = open(&m[2].join("f"));
    assert!(
        fcntl_lock(&fb, libc::F_WRLCK, false).is_err(),
        "host 1 holds it"
    );

    // The coordinator dies; host 1 stays alive and idle, holding its lock.
    kill_node_0_and_wait_for_a_new_coordinator(&mut c, "rl");
    // Host 2 asks: it waits out the grace period (host 1 reclaims in it) and is refused.
    let t = std::time::Instant::now();
    let err = fcntl_lock(&fb, libc::F_WRLCK, false).expect_err("a live host's lock was broken");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "{err}"
    );
    eprintln!("host 2's attempt answered after {:?}", t.elapsed());
    let v = c.json(1, &["volume", "inspect", "rl"]);
    let holder = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == n1.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("host 1 has a session at the new coordinator: {v}"));
    assert_eq!(holder["locks"], 1, "reclaimed at the new coordinator: {v}");
    // Host 1 lets go; now host 2 gets it.
    fcntl_lock(&fa, libc::F_UNLCK, false).unwrap();
    fcntl_lock(&fb, libc::F_WRLCK, false).expect("free once its holder unlocked");
    fcntl_lock(&fb, libc::F_UNLCK, false).unwrap();
    drop((fa, fb));
    shoal_tests::cleanup_mounts(&m[0]);
}
