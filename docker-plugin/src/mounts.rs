//! Which Docker mount IDs hold which volume mounted on this host.
//!
//! Docker sends Mount and Unmount with an ID per user of the volume (a container, a
//! `docker cp`); the volume is mounted at the first and unmounted at the last, so one
//! container stopping never takes the volume away from another. Pure bookkeeping: the
//! plugin does the mounting.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug)]
struct Entry {
    path: PathBuf,
    ids: BTreeSet<String>,
    /// The plugin attached the (non-shared) volume for this mount and detaches it after
    /// the last unmount, so another host can take it.
    detach_after: bool,
}

/// What the last unmount of a volume must undo.
#[derive(Debug, PartialEq, Eq)]
pub struct LastUnmount {
    pub path: PathBuf,
    pub detach_after: bool,
}

#[derive(Debug, Default)]
pub struct MountTable {
    volumes: HashMap<String, Entry>,
}

impl MountTable {
    /// Where the volume is mounted, if it is.
    pub fn path(&self, volume: &str) -> Option<&Path> {
        self.volumes.get(volume).map(|e| e.path.as_path())
    }

    /// How many IDs hold the volume.
    pub fn holders(&self, volume: &str) -> usize {
        self.volumes.get(volume).map_or(0, |e| e.ids.len())
    }

    /// One more holder of a volume already mounted; its path, or `None` when the volume
    /// is not mounted (the caller mounts it, then calls [`MountTable::mounted`]).
    pub fn hold(&mut self, volume: &str, id: &str) -> Option<PathBuf> {
        let e = self.volumes.get_mut(volume)?;
        e.ids.insert(id.to_string());
        Some(e.path.clone())
    }

    /// The volume was just mounted at `path` for `id`.
    pub fn mounted(&mut self, volume: &str, id: &str, path: PathBuf, detach_after: bool) {
        self.volumes.insert(
            volume.to_string(),
            Entry {
                path,
                ids: BTreeSet::from([id.to_string()]),
                detach_after,
            },
        );
    }

    /// `id` lets go of the volume. Returns what to undo when it was the last holder (the
    /// entry is gone then; [`MountTable::restore`] puts it back if unmounting fails). An
    /// ID that holds nothing is ignored: Docker retries Unmount after errors.
    pub fn release(&mut self, volume: &str, id: &str) -> Option<LastUnmount> {
        let e = self.volumes.get_mut(volume)?;
        if !e.ids.remove(id) || !e.ids.is_empty() {
            return None;
        }
        let e = self.volumes.remove(volume)?;
        Some(LastUnmount {
            path: e.path,
            detach_after: e.detach_after,
        })
    }

    /// Undoes a [`MountTable::release`] whose unmount failed.
    pub fn restore(&mut self, volume: &str, id: &str, last: LastUnmount) {
        self.mounted(volume, id, last.path, last.detach_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_at_first_unmounted_at_last() {
        let mut t = MountTable::default();
        assert_eq!(t.hold("web", "c1"), None);
        t.mounted("web", "c1", "/m/web".into(), false);
        assert_eq!(t.hold("web", "c2"), Some(PathBuf::from("/m/web")));
        // The same ID twice is one holder.
        assert_eq!(t.hold("web", "c2"), Some(PathBuf::from("/m/web")));
        assert_eq!(t.holders("web"), 2);
        assert_eq!(t.release("web", "c1"), None);
        assert_eq!(t.path("web"), Some(Path::new("/m/web")));
        // An unknown ID releases nothing.
        assert_eq!(t.release("web", "stranger"), None);
        assert_eq!(
            t.release("web", "c2"),
            Some(LastUnmount {
                path: "/m/web".into(),
                detach_after: false
            })
        );
        assert_eq!(t.holders("web"), 0);
        assert_eq!(t.path("web"), None);
        assert_eq!(t.release("web", "c2"), None);
    }

    #[test]
    fn a_failed_unmount_is_restored() {
        let mut t = MountTable::default();
        t.mounted("db", "c1", "/m/db".into(), true);
        let last = t.release("db", "c1").unwrap();
        assert!(last.detach_after);
        t.restore("db", "c1", last);
        assert_eq!(t.holders("db"), 1);
        assert_eq!(t.path("db"), Some(Path::new("/m/db")));
    }
}
