//! Failpoint `lose-unsynced` (off unless `SHOAL_FAILPOINTS` names it; for tests): a
//! power loss of this node's pool, simulated.
//!
//! Whenever the pool makes a replica durable (a flush, a write with FUA, an open that
//! fences it, a catching-up mark), it copies the replica's data and version files aside
//! to `<pool>/.powerloss/`: that copy is what the disk is known to hold. On
//! [`power_off`] every replica file is put back to its copy, so every write the pool
//! accepted but never synced is gone, as after a power cut with the page cache lost,
//! and the process ends at once. Writes the kernel may have written back by itself are
//! dropped too: the worst case for anything acknowledged without an `fsync`. The version
//! files are then stamped as last opened in another boot, as after a real power cut.
//!
//! `lose-unsynced-data` does the same but puts back only the data files: the version
//! files keep what was written to them, as when the kernel wrote the versions back but
//! not the data (a torn region: versions that claim data the disk does not hold).
//! `lose-unsynced-versions` is the other tear: only the version files are put back, the
//! data files keep every write (the kernel wrote the data back but not the versions:
//! data the versions do not account for).
//!
//! Activity logs (`<volume-id>.al`) are never put back: the pool syncs each write of one
//! before it returns.

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

const DIR: &str = ".powerloss";

/// Whether the failpoint is on for this process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        named("lose-unsynced") || named("lose-unsynced-data") || named("lose-unsynced-versions")
    })
}

fn named(point: &str) -> bool {
    std::env::var("SHOAL_FAILPOINTS").is_ok_and(|spec| spec.split(',').any(|p| p == point))
}

/// The replica `volume_id` in `pool_dir` was just made durable: remember what it holds.
pub(crate) fn synced(pool_dir: &Path, volume_id: &str) {
    let aside = pool_dir.join(DIR);
    if let Err(e) = fs::create_dir_all(&aside) {
        tracing::error!(error = %e, "failpoint lose-unsynced: cannot keep the synced copy");
        return;
    }
    for ext in ["img", "ver"] {
        let name = format!("{volume_id}.{ext}");
        let tmp = aside.join(format!("{name}.tmp"));
        if fs::copy(pool_dir.join(&name), &tmp).is_ok() {
            let _ = fs::rename(&tmp, aside.join(&name));
        }
    }
}

/// Puts every replica back to its last synced copy; returns how many. The caller ends
/// the process right after (nothing may write to the replicas in between).
pub fn power_off(pool_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(pool_dir.join(DIR)) else {
        return 0;
    };
    let mut restored = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let kept = (name.ends_with(".ver") && named("lose-unsynced-data"))
            || (name.ends_with(".img") && named("lose-unsynced-versions"));
        if name.ends_with(".tmp") || kept {
            continue;
        }
        if fs::rename(e.path(), pool_dir.join(name.as_ref())).is_ok() {
            restored += 1;
        }
    }
    // The host "rebooted": every version file was last opened in another boot.
    if let Ok(entries) = fs::read_dir(pool_dir) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "ver") {
                let _ = crate::versions::forget_boot(&e.path());
            }
        }
    }
    restored
}
