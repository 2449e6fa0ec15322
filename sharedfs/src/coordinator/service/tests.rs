//! Unit tests of the namespace service: sessions, grace, recalls, locks, replies.

use super::*;
use crate::coordinator::sessions::REPLY_HORIZON;
use crate::dev::{BlockDev, FileDev};
use crate::format::inode::ROOT_INO;

fn served(dir: &std::path::Path) -> Served {
    served_with_grace(dir, false)
}

/// A freshly formatted namespace in `dir`.
fn formatted(dir: &std::path::Path) -> Arc<dyn BlockDev> {
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::create(&dir.join("vol"), 64 << 20).unwrap());
    Fs::format(dev.clone(), [3; 16]).unwrap();
    dev
}

/// A coordinator of `dev` with one session (`session`) of mount `client`.
fn coordinator(dev: &Arc<dyn BlockDev>, session: u64, client: u64) -> Served {
    let s = Served::new(
        "v",
        Fs::open(dev.clone()).unwrap(),
        DEFAULT_LEASE,
        STOPPED_CLEAN,
    );
    s.sessions.lock().unwrap().open(
        session,
        Session::new(client, "h1".into(), "/m".into(), Instant::now()),
    );
    s
}

fn served_with_grace(dir: &std::path::Path, grace: bool) -> Served {
    let dev = formatted(dir);
    let found = if grace { SERVING } else { STOPPED_CLEAN };
    let s = Served::new("v", Fs::open(dev).unwrap(), DEFAULT_LEASE, found);
    let now = Instant::now();
    for id in [1, 2] {
        s.sessions
            .lock()
            .unwrap()
            .open(id, Session::new(0, format!("h{id}"), "/m".into(), now));
    }
    s
}

fn call(s: &Served, session: u64, op: Op) -> NsReply {
    let req = NsRequest {
        op: Some(op),
        ..Default::default()
    };
    s.execute(session, &req).0
}

fn create(s: &Served, name: &str) -> u64 {
    let r = call(
        s,
        1,
        Op::Create(Create {
            parent: ROOT_INO,
            name: name.into(),
            mode: libc::S_IFREG | 0o644,
            ..Default::default()
        }),
    );
    match r.result {
        Some(Res::Attr(a)) => a.ino,
        other => panic!("create: {other:?} {}", r.detail),
    }
}

#[test]
fn a_file_looked_up_then_renamed_over_elsewhere_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path());
    create(&s, "current");
    create(&s, ".tmp");
    // Mount 2 walks the path: the lookup hands it the live inode...
    let looked = call(
        &s,
        2,
        Op::Lookup(Lookup {
            parent: ROOT_INO,
            name: "current".into(),
        }),
    );
    let Some(Res::Attr(old)) = looked.result else {
        panic!("lookup: {}", looked.detail)
    };
    // ...mount 1 replaces the file before mount 2's open arrives...
    let r = call(
        &s,
        1,
        Op::Rename(Rename {
            parent: ROOT_INO,
            name: ".tmp".into(),
            new_parent: ROOT_INO,
            new_name: "current".into(),
            mode: 0,
        }),
    );
    assert_eq!(r.errno, 0, "{}", r.detail);
    // ...and the open still finds the file it looked up (not ESTALE).
    let opened = call(&s, 2, Op::Open(Ino { ino: old.ino }));
    assert_eq!(opened.errno, 0, "{}", opened.detail);
    call(
        &s,
        2,
        Op::Release(Release {
            ino: old.ino,
            ..Default::default()
        }),
    );
    // Once nobody has it open and the grace is over, the tick frees it.
    assert!(
        s.fs.lock().unwrap().getattr(old.ino).is_ok(),
        "kept for the grace"
    );
    s.expire(Instant::now() + UNLINK_GRACE);
    assert!(matches!(
        s.fs.lock().unwrap().getattr(old.ino),
        Err(FsError::NotFound)
    ));
    // A stale number past the grace is ESTALE, so the kernel walks the path again.
    let late = call(&s, 2, Op::Open(Ino { ino: old.ino }));
    assert_eq!(late.errno, libc::ESTALE);
}

#[test]
fn a_change_retried_at_a_new_coordinator_is_answered_from_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let dev = formatted(dir.path());
    let rename = Op::Rename(Rename {
        parent: ROOT_INO,
        name: ".tmp".into(),
        new_parent: ROOT_INO,
        new_name: "current".into(),
        mode: 0,
    });
    let mount = 0x5eed;
    let first = {
        let s = coordinator(&dev, 1, mount);
        create(&s, ".tmp");
        let req = NsRequest {
            seq: 5,
            done_below: 5,
            op: Some(rename.clone()),
            ..Default::default()
        };
        let r = s.execute(1, &req).0;
        assert_eq!(r.errno, 0, "{}", r.detail);
        // The coordinator dies here: its reply never reaches the mount.
        let ino =
            s.fs.lock()
                .unwrap()
                .lookup(ROOT_INO, b"current")
                .unwrap()
                .ino;
        ino
    };
    // The next coordinator opens the volume; the mount comes back in a new session,
    // after another mount made a new ".tmp".
    let s = Served::new(
        "v",
        Fs::open(dev.clone()).unwrap(),
        DEFAULT_LEASE,
        STOPPED_CLEAN,
    );
    assert!(
        s.sessions.lock().unwrap().is_departed(mount),
        "found at start"
    );
    s.sessions.lock().unwrap().open(
        7,
        Session::new(mount, "h1".into(), "/m".into(), Instant::now()),
    );
    assert!(
        !s.sessions.lock().unwrap().is_departed(mount),
        "back with a session"
    );
    create(&s, ".tmp");
    let retry = |seq| NsRequest {
        seq,
        done_below: seq,
        retry: true,
        op: Some(rename.clone()),
        ..Default::default()
    };
    let again = s.execute(7, &retry(5)).0;
    assert_eq!(again.errno, 0, "{}", again.detail);
    // Not run a second time: the new ".tmp" is still there, "current" is the first.
    let mut fs = s.fs.lock().unwrap();
    assert!(fs.lookup(ROOT_INO, b".tmp").is_ok());
    assert_eq!(fs.lookup(ROOT_INO, b"current").unwrap().ino, first);
    drop(fs);
    let record = |client, seq| s.fs.lock().unwrap().recorded_reply(client, seq).unwrap();
    // Another mount's number, or one never run, has no record.
    assert!(record(mount + 1, 5).is_none());
    assert!(record(mount, 6).is_none());
    // A retry of a change that never ran runs it.
    assert_eq!(s.execute(7, &retry(6)).0.errno, 0);
    assert_ne!(
        s.fs.lock()
            .unwrap()
            .lookup(ROOT_INO, b"current")
            .unwrap()
            .ino,
        first
    );
    // The mount is back: its records stay past the horizon.
    s.sessions.lock().unwrap().get_mut(7).unwrap().last_seen = Instant::now() + REPLY_HORIZON;
    s.expire(Instant::now() + REPLY_HORIZON);
    assert!(record(mount, 6).is_some());
}

#[test]
fn replies_of_a_mount_that_never_returns_are_forgotten_after_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let dev = formatted(dir.path());
    let op = Op::Create(Create {
        parent: ROOT_INO,
        name: "x".into(),
        mode: libc::S_IFREG | 0o644,
        ..Default::default()
    });
    {
        let s = coordinator(&dev, 1, 11);
        let req = NsRequest {
            seq: 3,
            done_below: 3,
            op: Some(op.clone()),
            ..Default::default()
        };
        assert_eq!(s.execute(1, &req).0.errno, 0);
    }
    let s = Served::new("v", Fs::open(dev).unwrap(), DEFAULT_LEASE, STOPPED_CLEAN);
    s.expire(Instant::now());
    let record = || s.fs.lock().unwrap().recorded_reply(11, 3).unwrap();
    assert!(record().is_some(), "kept for now");
    s.expire(Instant::now() + REPLY_HORIZON);
    assert!(record().is_none(), "gone after the horizon");
    assert!(s.fs.lock().unwrap().reply_clients().unwrap().is_empty());
}

#[test]
fn files_unlinked_while_open_outlive_a_crash_only_where_a_mount_reclaims_them() {
    let dir = tempfile::tempdir().unwrap();
    let dev = formatted(dir.path());
    let (kept, dropped) = {
        let s = coordinator(&dev, 1, 0);
        let kept = create(&s, "kept");
        let dropped = create(&s, "dropped");
        for (ino, name) in [(kept, "kept"), (dropped, "dropped")] {
            assert_eq!(call(&s, 1, Op::Open(Ino { ino })).errno, 0);
            let r = call(
                &s,
                1,
                Op::Unlink(Entry {
                    parent: ROOT_INO,
                    name: name.into(),
                }),
            );
            assert_eq!(r.errno, 0, "{}", r.detail);
        }
        (kept, dropped)
        // The coordinator dies with both open.
    };
    let fs = Fs::open_keeping_orphans(dev.clone()).unwrap();
    let s = Served::new("v", fs, DEFAULT_LEASE, SERVING);
    s.sessions
        .lock()
        .unwrap()
        .open(9, Session::new(5, "h1".into(), "/m".into(), Instant::now()));
    // The mount comes back with one of them open.
    s.reopen(
        9,
        &[OpenFile {
            ino: kept,
            count: 1,
        }],
    );
    let exists = |ino| s.fs.lock().unwrap().getattr(ino).is_ok();
    s.expire(Instant::now());
    assert!(
        exists(kept) && exists(dropped),
        "both kept during the grace"
    );
    // The grace is over; the mount kept renewing its session.
    let later = Instant::now() + DEFAULT_LEASE + UNLINK_GRACE;
    s.sessions.lock().unwrap().get_mut(9).unwrap().last_seen = later;
    s.expire(later);
    assert!(exists(kept), "still open at the mount");
    assert!(
        !exists(dropped),
        "nobody has it open: freed after the grace"
    );
    call(
        &s,
        9,
        Op::Release(Release {
            ino: kept,
            ..Default::default()
        }),
    );
    // (Released within the grace by the real clock: the tick frees it.)
    s.expire(later);
    assert!(!exists(kept), "freed at its last close");
    let r = s.fs.lock().unwrap().fsck(false).unwrap();
    assert!(r.clean(), "{:?}", r.problems);
}

#[test]
fn after_a_clean_stop_with_files_open_nothing_is_freed_until_mounts_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let dev = formatted(dir.path());
    let s = Served::new(
        "v",
        Fs::open(dev).unwrap(),
        DEFAULT_LEASE,
        STOPPED_WITH_OPEN_FILES,
    );
    s.sessions
        .lock()
        .unwrap()
        .open(1, Session::new(0, "h1".into(), "/m".into(), Instant::now()));
    let ino = create(&s, "f");
    let r = call(
        &s,
        1,
        Op::Unlink(Entry {
            parent: ROOT_INO,
            name: "f".into(),
        }),
    );
    assert_eq!(r.errno, 0);
    s.expire(Instant::now() + UNLINK_GRACE);
    assert!(
        s.fs.lock().unwrap().getattr(ino).is_ok(),
        "a mount that has not reconnected yet may have it open"
    );
    // Locks are not held back: no lock was held at the stop.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(s.hold_for_grace()).is_none());
    let later = Instant::now() + DEFAULT_LEASE + UNLINK_GRACE;
    s.sessions.lock().unwrap().get_mut(1).unwrap().last_seen = later;
    s.expire(later);
    assert!(s.fs.lock().unwrap().getattr(ino).is_err(), "freed after it");
    // A stopping coordinator changes nothing more: the mount asks the next one.
    s.closing.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = call(
        &s,
        1,
        Op::Create(Create {
            parent: ROOT_INO,
            name: "late".into(),
            mode: libc::S_IFREG | 0o644,
            ..Default::default()
        }),
    );
    assert_eq!(r.errno, libc::ESHUTDOWN);
    assert!(s.fs.lock().unwrap().lookup(ROOT_INO, b"late").is_err());
}

fn lk(owner: u64, reclaim: bool) -> Op {
    Op::Setlk(Lk {
        ino: ROOT_INO,
        owner,
        start: 0,
        end: 99,
        typ: libc::F_WRLCK,
        pid: 1,
        wait: false,
        fh: 7,
        reclaim,
    })
}

#[test]
fn locks_are_reclaimed_during_the_grace_and_refused_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = served_with_grace(dir.path(), true);
    assert_eq!(call(&s, 1, lk(5, true)).errno, 0, "reclaimed in the grace");
    assert_eq!(
        call(&s, 2, lk(6, true)).errno,
        libc::EAGAIN,
        "a conflicting reclaim is refused"
    );
    assert_eq!(s.locks.lock().unwrap().count_session(1), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    // Other lock requests wait: one poll later the grace (15 s) is still on.
    let waited = rt.block_on(s.hold_for_grace()).expect("still in the grace");
    assert_eq!(waited.errno, libc::EINPROGRESS);

    let dir2 = tempfile::tempdir().unwrap();
    let clean = served_with_grace(dir2.path(), false);
    assert!(
        rt.block_on(clean.hold_for_grace()).is_none(),
        "no grace, no wait"
    );
    assert_eq!(
        call(&clean, 1, lk(5, true)).errno,
        libc::ENOLCK,
        "a reclaim outside a grace is refused: the lock may have changed hands"
    );
    assert_eq!(call(&clean, 1, lk(5, false)).errno, 0);
}

#[test]
fn the_in_service_flag_tells_a_clean_stop_from_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let dev = formatted(dir.path());
    let mut fs = Fs::open(dev.clone()).unwrap();
    assert_eq!(
        fs.set_in_service(SERVING).unwrap(),
        STOPPED_CLEAN,
        "a new namespace was never served"
    );
    drop(fs); // a crash: nobody cleared it
    let mut fs = Fs::open(dev.clone()).unwrap();
    assert_eq!(fs.set_in_service(SERVING).unwrap(), SERVING, "grace");
    assert_eq!(fs.set_in_service(STOPPED_WITH_OPEN_FILES).unwrap(), SERVING);
    drop(fs); // a clean stop with files open on mounts
    let mut fs = Fs::open(dev.clone()).unwrap();
    assert_eq!(fs.set_in_service(SERVING).unwrap(), STOPPED_WITH_OPEN_FILES);
    assert_eq!(fs.set_in_service(STOPPED_CLEAN).unwrap(), SERVING);
    drop(fs); // a clean stop
    let mut fs = Fs::open(dev).unwrap();
    assert_eq!(
        fs.set_in_service(SERVING).unwrap(),
        STOPPED_CLEAN,
        "clean: no grace"
    );
}
