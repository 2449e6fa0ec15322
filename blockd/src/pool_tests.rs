//! Unit tests of the pool: thin allocation, fencing, missing replicas, restarts.

use super::*;

const MIB: u64 = 1 << 20;
const S: Stamp = Stamp {
    epoch: 1,
    version: 5,
    complete_below: 0,
};

/// A new replica opened (made) at epoch 1, as a volume's first coordinator does.
fn made(pool: &Pool, id: &str, size: u64) {
    let o = pool.open_replica(id, size, 1, 0, true, None).unwrap();
    assert_eq!(o.state, OpenState::Created);
}

#[test]
fn a_write_in_pieces_lands_back_to_back_even_in_more_pieces_than_iov_max() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), None).unwrap();
    let size = 64 * MIB;
    let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 253) as u8).collect();
    // Uneven pieces, empty ones among them, over 2 000 of them (more than IOV_MAX).
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut at = 0;
    for i in 0.. {
        if at == data.len() {
            break;
        }
        let n = [0usize, 1, 999, 4096][i % 4].min(data.len() - at);
        parts.push(&data[at..at + n]);
        at += n;
    }
    assert!(parts.len() > 1024);
    made(&pool, "v1", size);
    pool.write_parts("v1", size, 5 * MIB + 17, &parts, false, S)
        .unwrap();
    let back = pool
        .read("v1", size, 5 * MIB + 17, data.len() as u32)
        .unwrap();
    assert!(back == data, "the pieces did not land back to back");
    // A write in pieces past the volume's end is refused whole.
    let err = pool
        .write_parts("v1", size, size - 10, &[&[1u8; 8], &[2u8; 8]], false, S)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(pool.read("v1", size, size - 10, 10).unwrap(), vec![0u8; 10]);
}

#[test]
fn thin_allocation_grows_with_writes_and_discard_gives_back() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    // A 1 TiB volume on a 64 MiB pool costs nothing until written.
    let size = 1 << 40;
    made(&pool, "v1", size);
    assert_eq!(pool.read("v1", size, 0, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(pool.used(), 0);
    pool.write("v1", size, 10 * MIB, &vec![7u8; MIB as usize], false, S)
        .unwrap();
    assert!(
        pool.used() >= MIB && pool.used() < 2 * MIB,
        "used {}",
        pool.used()
    );
    assert_eq!(pool.replica_used("v1").unwrap(), pool.used());
    assert_eq!(pool.read("v1", size, 10 * MIB, 4).unwrap(), vec![7u8; 4]);
    pool.discard("v1", size, 10 * MIB, MIB, S).unwrap();
    assert_eq!(pool.used(), 0);
    assert_eq!(pool.read("v1", size, 10 * MIB, 4).unwrap(), vec![0u8; 4]);
}

#[test]
fn full_pool_refuses_with_enospc_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(2 * MIB)).unwrap();
    let size = 1 << 30;
    let block = vec![1u8; MIB as usize];
    made(&pool, "v", size);
    pool.write("v", size, 0, &block, false, S).unwrap();
    pool.write("v", size, MIB, &block, false, S).unwrap();
    let err = pool
        .write("v", size, 2 * MIB, &block, false, S)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    // Overwriting allocated space is still fine on a full pool.
    pool.write("v", size, 0, &vec![2u8; MIB as usize], true, S)
        .unwrap();
    assert_eq!(pool.read("v", size, 0, 2).unwrap(), vec![2, 2]);
    assert_eq!(pool.read("v", size, MIB, 2).unwrap(), vec![1, 1]);
}

#[test]
fn refuses_io_beyond_volume_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(MIB)).unwrap();
    made(&pool, "v", 4096);
    assert!(pool.write("v", 4096, 4000, &[0u8; 200], false, S).is_err());
    assert!(pool.read("v", 4096, u64::MAX, 2).is_err());
    assert!(pool.read("../etc", 4096, 0, 2).is_err());
}

#[test]
fn used_survives_reopen_and_delete_frees() {
    let dir = tempfile::tempdir().unwrap();
    {
        let pool = Pool::open(dir.path(), Some(8 * MIB)).unwrap();
        made(&pool, "a", 1 << 30);
        pool.write("a", 1 << 30, 0, &vec![1u8; MIB as usize], true, S)
            .unwrap();
    }
    let pool = Pool::open(dir.path(), Some(8 * MIB)).unwrap();
    assert!(pool.used() >= MIB);
    assert!(pool.replica_ids().unwrap().contains("a"));
    pool.delete("a").unwrap();
    assert_eq!(pool.used(), 0);
}

#[test]
fn out_of_order_writes_land_and_late_ones_are_refused_after_a_resync_floor() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let size = 16 * MIB;
    let st = |version| Stamp {
        epoch: 1,
        version,
        complete_below: 0,
    };
    made(&pool, "v", size);
    // Two writes to one region that do not overlap may arrive in either order; the
    // region keeps the newer version.
    pool.write("v", size, 4096, b"new", false, st(12)).unwrap();
    pool.write("v", size, 0, b"old", false, st(11)).unwrap();
    assert_eq!(pool.changed_regions("v", size, 0).unwrap(), vec![(0, 12)]);
    let (data, _) = pool.read_region("v", size, 0).unwrap();
    assert_eq!((&data[..3], &data[4096..4099]), (&b"old"[..], &b"new"[..]));
    // A resync is about to start from version 20: anything sent before is late.
    pool.open_replica("v", size, 1, 20, false, None).unwrap();
    let err = pool
        .write("v", size, 0, b"late", false, st(13))
        .unwrap_err();
    assert!(err.to_string().contains("late write"), "{err}");
    assert!(pool.discard("v", size, 0, 4096, st(19)).is_err());
    pool.write("v", size, 0, b"ok", false, st(20)).unwrap();
    // A lower floor later does not lower it.
    pool.open_replica("v", size, 1, 5, false, None).unwrap();
    assert!(pool.write("v", size, 0, b"x", false, st(15)).is_err());
}

#[test]
fn versions_follow_writes_and_old_epochs_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let size = 16 * MIB;
    let st = |epoch, version| Stamp {
        epoch,
        version,
        complete_below: 0,
    };
    made(&pool, "v", size);
    pool.write("v", size, 3 * MIB + 10, b"abc", false, st(1, 7))
        .unwrap();
    pool.write(
        "v",
        size,
        5 * MIB,
        &vec![1u8; 2 * MIB as usize],
        false,
        st(1, 8),
    )
    .unwrap();
    assert_eq!(
        pool.changed_regions("v", size, 0).unwrap(),
        vec![(3, 7), (5, 8), (6, 8)]
    );
    assert_eq!(
        pool.changed_regions("v", size, 7).unwrap(),
        vec![(5, 8), (6, 8)]
    );
    // A new coordinator fences the replica; the old one is refused everywhere.
    assert_eq!(
        pool.open_replica("v", size, 2, 0, false, None)
            .unwrap()
            .epoch,
        2
    );
    let err = pool.write("v", size, 0, b"x", false, st(1, 9)).unwrap_err();
    assert!(err.to_string().contains("stale epoch"), "{err}");
    assert!(pool.flush("v", size, 1, 0).is_err());
    assert!(pool.discard("v", size, 0, MIB, st(1, 9)).is_err());
    // Reads too: the replaced coordinator must not serve what its successor overwrites.
    let err = pool.read_at_epoch("v", size, 0, 4, 1).unwrap_err();
    assert!(matches!(err, Error::Fenced(_)), "{err}");
    assert_eq!(pool.read_at_epoch("v", size, 0, 4, 2).unwrap().len(), 4);
    assert!(pool
        .write_region("v", size, 0, &vec![0u8; MIB as usize], st(1, 9))
        .is_err());
    // Region copies: data and version together; zeros become a hole.
    let (data, ver) = pool.read_region("v", size, 3).unwrap();
    assert_eq!(ver, 7);
    assert_eq!(&data[10..13], b"abc");
    let other = Pool::open(&dir.path().join("b"), Some(64 * MIB)).unwrap();
    // A resync target is opened (made) at the copying coordinator's epoch.
    other.open_replica("v", size, 2, 0, true, None).unwrap();
    other.write_region("v", size, 3, &data, st(2, ver)).unwrap();
    other
        .write_region("v", size, 4, &vec![0u8; MIB as usize], st(2, 0))
        .unwrap();
    assert_eq!(other.read_region("v", size, 3).unwrap(), (data, 7));
    assert!(
        other.used() <= MIB + 4096,
        "zeros stay thin: {}",
        other.used()
    );
    assert!(
        other.write_region("v", size, 16, &[], st(2, 1)).is_err(),
        "beyond the volume"
    );
}

#[test]
fn a_missing_replica_is_never_made_empty_or_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let size = 16 * MIB;
    // Without `create`, a missing replica is reported and nothing is made.
    let o = pool.open_replica("v", size, 1, 0, false, None).unwrap();
    assert_eq!(o.state, OpenState::Missing);
    assert!(pool.replica_ids().unwrap().is_empty());
    for err in [
        pool.read("v", size, 0, 10).unwrap_err(),
        pool.write("v", size, 0, b"x", false, S).unwrap_err(),
        pool.flush("v", size, 1, 0).unwrap_err(),
        pool.changed_regions("v", size, 0).unwrap_err(),
        pool.read_region("v", size, 0).unwrap_err(),
    ] {
        assert!(matches!(err, Error::ReplicaMissing(_)), "{err}");
    }
    assert!(pool.replica_ids().unwrap().is_empty(), "nothing was made");
    // A replica whose version file was lost is missing too.
    made(&pool, "w", size);
    pool.write("w", size, 0, b"data", true, S).unwrap();
    drop(pool);
    fs::remove_file(dir.path().join("replicas/w.ver")).unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let o = pool.open_replica("w", size, 2, 0, false, None).unwrap();
    assert_eq!(o.state, OpenState::Missing);
    assert!(!dir.path().join("replicas/w.ver").exists());
}

#[test]
fn writes_need_the_epoch_the_replica_was_opened_at_and_it_describes_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let size = 16 * MIB;
    let desc = Descriptor {
        cluster_id: "c".into(),
        cluster_uuid: "u".into(),
        volume_id: "v".into(),
        name: "db".into(),
        size_bytes: size,
        repl: 2,
        block_size: 4096,
        fs: "ext4".into(),
        shared: false,
        io_priority: "medium".into(),
        labels: [("app".to_string(), "pg".to_string())].into(),
        formatted: true,
        created_unix: 7,
    };
    pool.open_replica("v", size, 3, 0, true, Some(&desc))
        .unwrap();
    // A write from an epoch that never opened the replica (u64::MAX, say) is refused
    // and fences nothing.
    let far = Stamp {
        epoch: u64::MAX,
        version: 1,
        complete_below: 0,
    };
    let err = pool.write("v", size, 0, b"x", false, far).unwrap_err();
    assert!(err.to_string().contains("never opened"), "{err}");
    let ok = Stamp {
        epoch: 3,
        version: 3 << 40 | 9,
        complete_below: 0,
    };
    pool.write("v", size, 0, b"x", true, ok).unwrap();
    let d = pool.describe("v").unwrap();
    assert_eq!(d.descriptor, Some(desc));
    assert_eq!((d.epoch, d.max_version), (3, 3 << 40 | 9));
}

#[test]
fn data_without_versions_made_again_reads_as_zeros_and_marks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    {
        let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
        made(&pool, "v", size);
        pool.write("v", size, 0, b"old data", true, S).unwrap();
        pool.set_catching_up("v", true).unwrap();
    }
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    assert!(pool.describe("v").unwrap().catching_up, "durable mark");
    pool.set_catching_up("v", false).unwrap();
    assert!(!pool.describe("v").unwrap().catching_up);
    drop(pool);
    // The version file is lost; a resync target made again must not keep old bytes
    // that the copy would never overwrite.
    fs::remove_file(dir.path().join("replicas/v.ver")).unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let o = pool.open_replica("v", size, 2, 0, true, None).unwrap();
    assert_eq!(o.state, OpenState::Created);
    assert_eq!(pool.read("v", size, 0, 8).unwrap(), vec![0u8; 8]);
}

#[test]
fn a_torn_descriptor_is_written_again_not_a_reason_to_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    made(&pool, "v", size);
    drop(pool);
    let ver = OpenOptions::new()
        .write(true)
        .open(dir.path().join("replicas/v.ver"))
        .unwrap();
    ver.write_all_at(&[20, 0, 0, 0, b'{', b'x'], 64).unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    assert!(pool.describe("v").is_err(), "torn");
    let desc = Descriptor {
        cluster_id: "c".into(),
        cluster_uuid: "u".into(),
        volume_id: "v".into(),
        name: "n".into(),
        size_bytes: size,
        repl: 1,
        block_size: 4096,
        fs: "none".into(),
        shared: false,
        io_priority: "low".into(),
        labels: Default::default(),
        formatted: false,
        created_unix: 1,
    };
    pool.open_replica("v", size, 2, 0, false, Some(&desc))
        .unwrap();
    assert_eq!(pool.describe("v").unwrap().descriptor, Some(desc));
}

#[test]
fn after_a_restart_a_replica_refuses_changes_until_opened_again() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    {
        let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
        made(&pool, "v", size);
        pool.write("v", size, 0, b"kept", true, S).unwrap();
    }
    // The node restarted: its page cache may be gone with writes not yet flushed.
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    for err in [
        pool.write("v", size, 0, b"x", false, S).unwrap_err(),
        pool.flush("v", size, 1, 0).unwrap_err(),
        pool.discard("v", size, 0, 4096, S).unwrap_err(),
        // A coordinator's read too: what it would get may be older than what was
        // acknowledged. (Resync reads, `read_region`, come from in-sync sources.)
        pool.read_at_epoch("v", size, 0, 4, 1).unwrap_err(),
    ] {
        assert!(err.to_string().contains(RESTARTED), "{err}");
    }
    assert_eq!(pool.read("v", size, 0, 4).unwrap(), b"kept");
    // A same-epoch open (a write floor) does not let it back in.
    let err = pool.open_replica("v", size, 1, 9, false, None).unwrap_err();
    assert!(err.to_string().contains(RESTARTED), "{err}");
    assert!(pool.write("v", size, 0, b"x", false, S).is_err());
    // Its resync opens it again: changes land again.
    pool.allow_reopen("v");
    pool.open_replica("v", size, 1, 0, false, None).unwrap();
    pool.write("v", size, 0, b"new!", true, S).unwrap();
    assert_eq!(pool.read_at_epoch("v", size, 0, 4, 1).unwrap(), b"new!");
}

#[test]
fn a_replica_first_opened_in_another_boot_is_marked_until_its_resync_forgets_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let synced = Stamp {
        epoch: 1,
        version: 7,
        complete_below: 6,
    };
    {
        let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
        made(&pool, "v", size);
        pool.write("v", size, 0, b"x", false, synced).unwrap();
        pool.flush("v", size, 1, 7).unwrap();
        let o = pool.open_replica("v", size, 2, 0, false, None).unwrap();
        assert_eq!(o.reboot_below, None, "same boot: trusted");
    }
    // The node restarts in the same boot: still trusted.
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let o = pool.open_replica("v", size, 3, 0, false, None).unwrap();
    assert_eq!(o.reboot_below, None);
    drop(pool);
    // The host rebooted: marked with the watermark of its last sync, durably.
    let ver = dir.path().join("replicas/v.ver");
    crate::versions::forget_boot(&ver).unwrap();
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let o = pool.open_replica("v", size, 4, 0, false, None).unwrap();
    assert_eq!(o.reboot_below, Some(7));
    drop(pool);
    let pool = Pool::open(dir.path(), Some(64 * MIB)).unwrap();
    let o = pool.open_replica("v", size, 5, 0, false, None).unwrap();
    assert_eq!(o.reboot_below, Some(7), "the mark outlives another restart");
    // A resync forgets the reboot (the catching-up mark stays until it rejoined), then
    // clears the mark.
    pool.clear_reboot("v").unwrap();
    let o = pool.open_replica("v", size, 5, 0, false, None).unwrap();
    assert_eq!(o.reboot_below, None);
    assert!(pool.describe("v").unwrap().catching_up);
    pool.set_catching_up("v", false).unwrap();
    assert!(!pool.describe("v").unwrap().catching_up);
}
