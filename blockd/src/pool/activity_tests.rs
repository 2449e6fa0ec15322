//! Unit tests of the pool's activity log: what a write logs, and what the first open
//! after a reboot raises.

use super::*;
use crate::activity::EXTENT_BYTES;
use crate::versions::first_version;

const MIB: u64 = 1 << 20;

fn stamp(version: u64) -> Stamp {
    Stamp {
        epoch: 1,
        version,
        complete_below: 0,
    }
}

/// A pool in `dir` with replica `v` of `size` made at epoch 1.
fn pool_with(dir: &Path, size: u64) -> Pool {
    let pool = Pool::open(dir, Some(1 << 40)).unwrap();
    pool.open_replica("v", size, 1, 0, true, None).unwrap();
    pool
}

/// The host "reboots": the pool is dropped, its version file forgets the boot, and
/// `lose` may change the files as a power cut would; then it is opened at epoch 2.
fn reboot(dir: &Path, size: u64, lose: impl FnOnce(&Path)) -> Pool {
    let rdir = dir.join("replicas");
    lose(&rdir);
    crate::versions::forget_boot(&rdir.join("v.ver")).unwrap();
    let pool = Pool::open(dir, Some(1 << 40)).unwrap();
    let o = pool.open_replica("v", size, 2, 0, false, None).unwrap();
    assert!(o.reboot_below.is_some(), "the reboot is seen");
    pool
}

fn version(pool: &Pool, size: u64, region: u64) -> u64 {
    pool.changed_regions("v", size, 0)
        .unwrap()
        .into_iter()
        .find(|(g, _)| *g == region)
        .map_or(0, |(_, v)| v)
}

#[test]
fn writes_log_their_extents_before_the_data_and_only_cold_ones_cost_io() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let pool = pool_with(dir.path(), size);
    assert!(!pool.write_is_quick("v", 0, 4096), "extent 0 is cold");
    pool.write("v", size, 0, b"a", false, stamp(first_version(1)))
        .unwrap();
    assert!(pool.write_is_quick("v", 4096, 4096), "extent 0 is logged");
    assert!(!pool.write_is_quick("v", EXTENT_BYTES, 1));
    assert!(
        !pool.write_is_quick("w", 0, 1),
        "an unknown replica is not quick"
    );
    // The log is on disk: a new pool (same boot) finds it.
    drop(pool);
    let log = crate::activity::ActivityLog::open(&dir.path().join("replicas/v.al")).unwrap();
    assert_eq!(log.suspects(), Some(vec![0]));
}

#[test]
fn after_a_reboot_the_logged_regions_holding_data_or_a_version_are_raised() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let pool = pool_with(dir.path(), size);
    let v1 = first_version(1);
    // Region 0 written and synced; region 3 written (unsynced); region 20 (extent 1)
    // written and synced; region 40 (extent 2) never written.
    pool.write("v", size, 0, b"a", false, stamp(v1)).unwrap();
    pool.write("v", size, 20 * MIB, b"c", false, stamp(v1 + 1))
        .unwrap();
    pool.flush("v", size, 1, v1 + 2).unwrap();
    pool.write("v", size, 3 * MIB, b"b", false, stamp(v1 + 2))
        .unwrap();
    drop(pool);
    // The power cut kept region 3's data but not its version (the other tear).
    let pool = reboot(dir.path(), size, |rdir| {
        let f = OpenOptions::new()
            .write(true)
            .open(rdir.join("v.ver"))
            .unwrap();
        f.write_all_at(&0u64.to_le_bytes(), 4096 + 3 * 8).unwrap();
    });
    let raised = first_version(2) - 1;
    assert_eq!(version(&pool, size, 3), raised, "data without its version");
    assert_eq!(
        version(&pool, size, 0),
        raised,
        "every written region of the extent"
    );
    assert_eq!(version(&pool, size, 1), 0, "a region with nothing stays");
    assert_eq!(version(&pool, size, 20), raised, "extent 1 was logged too");
    assert_eq!(version(&pool, size, 40), 0);
    // Durable, and done once: the log is empty, a new write logs again.
    drop(pool);
    let pool = Pool::open(dir.path(), Some(1 << 40)).unwrap();
    pool.open_replica("v", size, 3, 0, false, None).unwrap();
    assert_eq!(version(&pool, size, 3), raised);
    assert!(!pool.write_is_quick("v", 0, 1), "the log was emptied");
}

#[test]
fn after_a_reboot_without_a_log_every_written_region_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let pool = pool_with(dir.path(), size);
    let v1 = first_version(1);
    pool.write("v", size, 0, b"a", false, stamp(v1)).unwrap();
    pool.write("v", size, 50 * MIB, b"z", false, stamp(v1 + 1))
        .unwrap();
    drop(pool);
    let pool = reboot(dir.path(), size, |rdir| {
        // The log is gone, and region 50's version too: its data still counts.
        std::fs::remove_file(rdir.join("v.al")).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(rdir.join("v.ver"))
            .unwrap();
        f.write_all_at(&0u64.to_le_bytes(), 4096 + 50 * 8).unwrap();
    });
    let raised = first_version(2) - 1;
    assert_eq!(version(&pool, size, 0), raised);
    assert_eq!(version(&pool, size, 50), raised, "data found by its blocks");
    assert_eq!(pool.changed_regions("v", size, 0).unwrap().len(), 2);
}

#[test]
fn a_replica_without_a_log_in_the_same_boot_is_synced_and_gets_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let pool = pool_with(dir.path(), size);
    pool.write("v", size, 0, b"a", false, stamp(first_version(1)))
        .unwrap();
    drop(pool);
    std::fs::remove_file(dir.path().join("replicas/v.al")).unwrap();
    let pool = Pool::open(dir.path(), Some(1 << 40)).unwrap();
    let o = pool.open_replica("v", size, 2, 0, false, None).unwrap();
    assert_eq!(o.reboot_below, None, "same boot: trusted");
    assert_eq!(version(&pool, size, 0), first_version(1), "nothing raised");
    drop(pool);
    let log = crate::activity::ActivityLog::open(&dir.path().join("replicas/v.al")).unwrap();
    assert_eq!(log.suspects(), Some(vec![]), "a valid, empty log");
}

#[test]
fn a_wide_discard_makes_its_versions_durable_and_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 30;
    let pool = pool_with(dir.path(), size);
    let v1 = first_version(1);
    pool.discard("v", size, 0, size, stamp(v1)).unwrap();
    assert!(!pool.write_is_quick("v", 0, 1), "nothing logged");
    assert_eq!(version(&pool, size, 4095), v1);
    // A narrow one goes through the log.
    pool.discard("v", size, 0, MIB, stamp(v1 + 1)).unwrap();
    assert!(pool.write_is_quick("v", 0, 1));
}
