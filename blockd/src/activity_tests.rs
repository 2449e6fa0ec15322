//! Unit tests of the activity log: the pure set, the slots, and the file.

use super::*;

const MIB: u64 = 1 << 20;

#[test]
fn extents_and_their_regions() {
    assert_eq!(extents_of(0, 0), 0..0);
    assert_eq!(extents_of(0, 1), 0..1);
    assert_eq!(extents_of(EXTENT_BYTES - 1, 2), 0..2);
    assert_eq!(extents_of(3 * EXTENT_BYTES, MIB), 3..4);
    assert_eq!(regions_of_extent(0), 0..16);
    assert_eq!(regions_of_extent(2), 32..48);
}

#[test]
fn a_cold_extent_is_written_once_then_no_more() {
    let mut h = Hot::default();
    assert_eq!(h.add(0..1), Add::Write);
    h.end(0..1);
    assert_eq!(h.add(0..1), Add::Logged);
    h.end(0..1);
    assert_eq!(h.add(0..2), Add::Write, "one of the two is new");
    h.end(0..2);
    assert!(h.covers(0..2));
    assert!(!h.covers(0..3));
}

#[test]
fn a_full_log_asks_for_a_sync_then_keeps_the_newest_half() {
    let mut h = Hot::default();
    for e in 0..CAPACITY as u64 {
        assert_eq!(h.add(e..e + 1), Add::Write);
        h.end(e..e + 1);
    }
    // Extent 0 written again: it is the newest now.
    assert_eq!(h.add(0..1), Add::Logged);
    h.end(0..1);
    assert_eq!(h.add(9999..10000), Add::Full);
    assert!(!h.covers(9999..10000), "a full answer logs nothing");
    h.trim();
    assert_eq!(h.len(), CAPACITY / 2);
    assert!(h.covers(0..1), "the most recently written stays");
    assert!(!h.covers(1..2), "the oldest goes");
    assert!(h.covers(CAPACITY as u64 - 1..CAPACITY as u64));
    assert_eq!(h.add(9999..10000), Add::Write);
}

#[test]
fn a_trim_keeps_extents_with_writes_under_way() {
    let mut h = Hot::default();
    assert_eq!(h.add(0..1), Add::Write); // still busy: never ended
    for e in 1..CAPACITY as u64 {
        h.add(e..e + 1);
        h.end(e..e + 1);
    }
    h.trim();
    assert!(
        h.covers(0..1),
        "the oldest extent is busy: a sync may have missed it"
    );
    assert_eq!(h.len(), CAPACITY / 2);
    let idle = h.idle();
    h.forget(&idle);
    assert_eq!(h.extents(), vec![0], "forgetting keeps busy extents");
    h.end(0..1);
    // Extent 0's write ended after the snapshot: a sync that began at the snapshot may
    // have missed it, so it stays too.
    h.forget(&idle);
    assert_eq!(h.extents(), vec![0]);
    let idle = h.idle();
    // Written again after this snapshot: kept.
    h.add(0..1);
    h.end(0..1);
    h.add(7..8);
    h.end(7..8);
    h.forget(&idle);
    assert_eq!(
        h.extents(),
        vec![0, 7],
        "writes after the snapshot keep their extents"
    );
    let idle = h.idle();
    h.forget(&idle);
    assert!(h.is_empty());
}

#[test]
fn slots_round_trip_and_a_torn_one_is_refused() {
    let s = encode_slot(7, &[3, 1, 2]);
    assert_eq!(decode_slot(&s), Some((7, vec![3, 1, 2])));
    let mut torn = s.clone();
    torn[30] ^= 1;
    assert_eq!(decode_slot(&torn), None);
    assert_eq!(decode_slot(&vec![0u8; s.len()]), None);
    let older = Some((6, vec![1]));
    assert_eq!(
        newest(older.clone(), decode_slot(&s)),
        Some((7, vec![3, 1, 2]))
    );
    assert_eq!(newest(older.clone(), None), older);
    assert_eq!(newest(None, None), None);
}

#[test]
fn the_file_keeps_the_log_across_opens_and_a_torn_slot_leaves_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.al");
    let log = ActivityLog::open(&path).unwrap();
    assert!(log.lost(), "a new file holds no log");
    assert_eq!(log.suspects(), None);
    drop(log.note(0, MIB, || Ok(())).unwrap());
    drop(log.note(5 * EXTENT_BYTES, MIB, || Ok(())).unwrap());
    assert_eq!(log.suspects(), Some(vec![0, 5]));
    drop(log);
    let log = ActivityLog::open(&path).unwrap();
    assert_eq!(log.suspects(), Some(vec![0, 5]));
    assert!(log.covers(0, MIB));
    assert!(!log.covers(EXTENT_BYTES, MIB));
    drop(log.note(EXTENT_BYTES, MIB, || Ok(())).unwrap());
    drop(log);
    // The newest slot is torn (a power cut mid-write): the one before it is the log.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let seq = 3u64;
    f.write_all_at(&[0xff; 16], (seq % 2) * SLOT_BYTES as u64 + 20)
        .unwrap();
    let log = ActivityLog::open(&path).unwrap();
    assert_eq!(log.suspects(), Some(vec![0, 5]));
    // Both torn: lost, so every written region is suspect.
    f.write_all_at(&[0xff; 16], ((seq + 1) % 2) * SLOT_BYTES as u64 + 20)
        .unwrap();
    let log = ActivityLog::open(&path).unwrap();
    assert!(log.lost());
    log.forget(&log.idle()).unwrap();
    let log = ActivityLog::open(&path).unwrap();
    assert_eq!(log.suspects(), Some(vec![]));
}

#[test]
fn a_full_log_syncs_the_replica_once_and_a_failed_sync_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = ActivityLog::open(&dir.path().join("v.al")).unwrap();
    for e in 0..CAPACITY as u64 {
        drop(
            log.note(e * EXTENT_BYTES, MIB, || panic!("not full yet"))
                .unwrap(),
        );
    }
    let far = 10_000 * EXTENT_BYTES;
    let failed = log.note(far, MIB, || {
        Err(crate::error::Error::Internal("disk".into()))
    });
    assert!(failed.is_err());
    assert!(!log.covers(far, MIB));
    let mut syncs = 0;
    drop(
        log.note(far, MIB, || {
            syncs += 1;
            Ok(())
        })
        .unwrap(),
    );
    assert_eq!(syncs, 1);
    assert!(log.covers(far, MIB));
    assert_eq!(log.suspects().unwrap().len(), CAPACITY / 2 + 1);
}

#[test]
fn a_write_wider_than_the_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = ActivityLog::open(&dir.path().join("v.al")).unwrap();
    let wide = (CAPACITY as u64 + 1) * EXTENT_BYTES;
    assert!(log.note(0, wide, || Ok(())).is_err());
}

#[test]
fn a_log_write_that_fails_logs_nothing_and_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.al");
    drop(ActivityLog::open(&path).unwrap());
    // A log whose file cannot be written (as a full or failing disk).
    let log = ActivityLog {
        file: File::open(&path).unwrap(),
        state: Mutex::new(State {
            hot: Hot::default(),
            seq: 0,
        }),
    };
    assert!(log.note(0, MIB, || Ok(())).is_err());
    assert!(!log.covers(0, MIB), "not on disk, so not logged");
    assert!(!log.covers_now(0, MIB));
    // Nothing stays busy or locked: the next call answers (and fails again).
    assert!(log.note(0, MIB, || Ok(())).is_err());
    assert!(log.lost(), "no slot was ever written");
    assert!(log.state.lock().unwrap().hot.idle().extents.is_empty());
}

#[test]
fn covers_now_never_waits_for_a_busy_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = ActivityLog::open(&dir.path().join("v.al")).unwrap();
    drop(log.note(0, MIB, || Ok(())).unwrap());
    assert!(log.covers_now(0, MIB));
    let held = log.state.lock().unwrap();
    assert!(!log.covers_now(0, MIB), "busy: not quick");
    drop(held);
    assert!(log.covers_now(0, MIB));
}
