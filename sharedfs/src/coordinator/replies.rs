//! Replies to changes, recorded in the volume: what makes a retried create, rename,
//! unlink or append safe across a coordinator failover.
//!
//! A mount may send a request, lose the connection before the answer, and send it again
//! (same mount id, same sequence number) to whichever coordinator serves next. The
//! coordinator keeps recent replies in memory, but a new coordinator has none of them,
//! and running the request again is wrong: the create fails with EEXIST, the unlink with
//! ENOENT, the append lands twice, the rename moves whatever got the old name since.
//! So a change that cannot simply run again records its outcome in the same transaction
//! as the change itself:
//!
//! ```text
//! key    R | mount id (BE u64) | seq (BE u64)
//! value  kind u8 (0 = done, 1 = an inode's attributes) | ino u64 | session u64
//! ```
//! (`session`: the coordinator's session the change ran in, so an answer from the record
//! in that same session does not count a create-and-open a second time.)
//! Committed together, the change and its record are both in the volume or neither is.
//! A retry that finds the record gets the recorded outcome (the inode's attributes as they
//! are now) without running again. Each mount tells which of its requests are answered
//! (`done_below`); the records below that are deleted with the next one it makes, so a
//! mount has about as many records as requests in flight. A mount's records go when its
//! session ends, and a new coordinator drops those of mounts that do not come back.

use std::ops::Bound;

use crate::error::{FsError, Result};
use crate::fs::Fs;

const TAG: u8 = b'R';
/// Old records deleted per new one at most (more go with the next).
const PRUNE_BATCH: usize = 64;
/// Records deleted per transaction when a mount's records go.
pub const FORGET_BATCH: usize = 512;

/// Which request a change answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTag {
    /// The mount's id (never 0).
    pub client: u64,
    /// The coordinator's session the change runs in.
    pub session: u64,
    pub seq: u64,
    /// The mount's requests below this have their answers.
    pub done_below: u64,
}

/// What a recorded change returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success without a result (unlink, rename, ...).
    Done,
    /// Success with an inode's attributes (create, link, write, ...).
    Inode(u64),
}

fn key(client: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(TAG);
    k.extend_from_slice(&client.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn encode(o: Outcome, session: u64) -> Vec<u8> {
    let (kind, ino) = match o {
        Outcome::Done => (0u8, 0u64),
        Outcome::Inode(i) => (1, i),
    };
    let mut v = vec![kind];
    v.extend_from_slice(&ino.to_le_bytes());
    v.extend_from_slice(&session.to_le_bytes());
    v
}

fn decode(v: &[u8]) -> Result<(Outcome, u64)> {
    let word = |at: usize| {
        v.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let session = word(9).unwrap_or(0);
    match (v.first(), word(1)) {
        (Some(0), Some(_)) => Ok((Outcome::Done, session)),
        (Some(1), Some(i)) => Ok((Outcome::Inode(i), session)),
        _ => Err(FsError::Corrupt(format!("a recorded reply {v:?}"))),
    }
}

impl Fs {
    /// Runs the change `f` as one transaction that also records its outcome under `tag`
    /// (when given) and forgets the mount's replies below `tag.done_below`.
    pub fn recorded<T>(
        &mut self,
        tag: Option<ReplyTag>,
        f: impl FnOnce(&mut Fs) -> Result<T>,
        outcome: impl FnOnce(&T) -> Outcome,
    ) -> Result<T> {
        let Some(tag) = tag.filter(|t| t.client != 0) else {
            return f(self);
        };
        self.run(|fs| {
            let v = f(fs)?;
            fs.record(tag, outcome(&v))?;
            Ok(v)
        })
    }

    /// `recorded` for a change whose outcome is known before it runs and that may commit
    /// in several steps (a truncate that frees many extents): the record goes first, so
    /// it is in the volume from the first step on.
    pub fn recorded_ahead<T>(
        &mut self,
        tag: Option<ReplyTag>,
        outcome: Outcome,
        f: impl FnOnce(&mut Fs) -> Result<T>,
    ) -> Result<T> {
        let Some(tag) = tag.filter(|t| t.client != 0) else {
            return f(self);
        };
        self.run(|fs| {
            fs.record(tag, outcome)?;
            f(fs)
        })
    }

    fn record(&mut self, tag: ReplyTag, outcome: Outcome) -> Result<()> {
        self.bt_put(&key(tag.client, tag.seq), &encode(outcome, tag.session))?;
        let below = tag.done_below.min(tag.seq);
        let old = self.bt_range(
            &key(tag.client, 0),
            Bound::Excluded(&key(tag.client, below)),
            PRUNE_BATCH,
        )?;
        for (k, _) in old {
            self.bt_del(&k)?;
        }
        Ok(())
    }

    /// The outcome recorded for a mount's request, if it ran, and the session it ran in.
    pub fn recorded_reply(&mut self, client: u64, seq: u64) -> Result<Option<(Outcome, u64)>> {
        if client == 0 {
            return Ok(None);
        }
        self.bt_get(&key(client, seq))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every recorded reply's key, with the mount it belongs to, in key order.
    fn record_keys(&mut self) -> Result<Vec<(u64, Vec<u8>)>> {
        Ok(self
            .bt_range(&[TAG], Bound::Excluded(&[TAG + 1]), usize::MAX)?
            .into_iter()
            .filter(|(k, _)| k.len() == 17)
            .map(|(k, _)| (u64::from_be_bytes(k[1..9].try_into().unwrap()), k))
            .collect())
    }

    /// The mounts with recorded replies.
    pub fn reply_clients(&mut self) -> Result<Vec<u64>> {
        let mut ids: Vec<u64> = self.record_keys()?.into_iter().map(|(c, _)| c).collect();
        ids.dedup();
        Ok(ids)
    }

    /// Forgets every reply recorded for the mounts `drop` picks (by id), in transactions
    /// of at most [`FORGET_BATCH`] records (one must fit in the journal); returns how many
    /// went.
    pub fn forget_replies(&mut self, drop: impl Fn(u64) -> bool) -> Result<usize> {
        let doomed: Vec<Vec<u8>> = self
            .record_keys()?
            .into_iter()
            .filter(|(c, _)| drop(*c))
            .map(|(_, k)| k)
            .collect();
        for batch in doomed.chunks(FORGET_BATCH) {
            self.run(|fs| {
                for k in batch {
                    fs.bt_del(k)?;
                }
                Ok(())
            })?;
        }
        Ok(doomed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{BlockDev, FileDev};
    use crate::fs::Cred;
    use std::sync::Arc;

    fn fresh() -> (tempfile::TempDir, Arc<dyn BlockDev>, Fs) {
        let dir = tempfile::tempdir().unwrap();
        let dev: Arc<dyn BlockDev> =
            Arc::new(FileDev::create(&dir.path().join("vol"), 64 << 20).unwrap());
        Fs::format(dev.clone(), [7; 16]).unwrap();
        let fs = Fs::open(dev.clone()).unwrap();
        (dir, dev, fs)
    }

    fn tag(seq: u64, done_below: u64) -> Option<ReplyTag> {
        Some(ReplyTag {
            client: 42,
            session: 3,
            seq,
            done_below,
        })
    }

    #[test]
    fn a_change_and_its_record_commit_together_and_survive_a_reopen() {
        let (_dir, dev, mut fs) = fresh();
        let cred = Cred { uid: 0, gid: 0 };
        let i = fs
            .recorded(
                tag(5, 5),
                |fs| fs.create(1, b"a", libc::S_IFREG | 0o644, 0, cred, None),
                |i| Outcome::Inode(i.ino),
            )
            .unwrap();
        // A change that fails records nothing (and changes nothing).
        let again = fs.recorded(
            tag(6, 5),
            |fs| fs.create(1, b"a", libc::S_IFREG | 0o644, 0, cred, None),
            |i| Outcome::Inode(i.ino),
        );
        assert!(matches!(again, Err(FsError::Exists)));
        drop(fs);
        // What a new coordinator finds after replaying the journal.
        let mut fs = Fs::open(dev).unwrap();
        assert_eq!(
            fs.recorded_reply(42, 5).unwrap(),
            Some((Outcome::Inode(i.ino), 3))
        );
        assert_eq!(fs.recorded_reply(42, 6).unwrap(), None);
        assert_eq!(fs.recorded_reply(43, 5).unwrap(), None);
        assert_eq!(fs.recorded_reply(0, 5).unwrap(), None);
    }

    /// A file of 300 one-block extents (every other block): more than one truncate step.
    fn fragmented(fs: &mut Fs) -> crate::format::inode::Inode {
        let cred = Cred { uid: 0, gid: 0 };
        let f = fs
            .create(1, b"big", libc::S_IFREG | 0o644, 0, cred, None)
            .unwrap();
        for i in 0..300u64 {
            fs.write(f.ino, i * 8192, &[7u8; 4096], false).unwrap();
        }
        f
    }

    #[test]
    fn a_truncate_in_several_steps_is_recorded_from_the_first_and_a_failure_records_nothing() {
        let (_dir, dev, mut fs) = fresh();
        let f = fragmented(&mut fs);
        let cut = crate::fs::SetAttr {
            size: Some(0),
            ..Default::default()
        };
        fs.recorded_ahead(tag(4, 4), Outcome::Inode(f.ino), |fs| {
            fs.setattr(f.ino, &cut)
        })
        .unwrap();
        assert_eq!(fs.getattr(f.ino).unwrap().size, 0);
        // A change that fails takes its record with it.
        let missing = fs.recorded_ahead(tag(5, 4), Outcome::Inode(999_999), |fs| {
            fs.setattr(999_999, &cut)
        });
        assert!(missing.is_err());
        drop(fs);
        let mut fs = Fs::open(dev).unwrap();
        assert_eq!(
            fs.recorded_reply(42, 4).unwrap(),
            Some((Outcome::Inode(f.ino), 3))
        );
        assert_eq!(fs.recorded_reply(42, 5).unwrap(), None);
        let r = fs.fsck(false).unwrap();
        assert!(r.clean(), "{:?}", r.problems);
    }

    #[test]
    fn a_truncate_a_crash_interrupted_is_finished_at_the_next_open() {
        let (_dir, dev, mut fs) = fresh();
        let f = fragmented(&mut fs);
        let free = fs.statfs().free;
        // What a crash between two batches of a truncate to 0 leaves: the size cut, the
        // marker set, extents still past the size.
        fs.run(|fs| {
            let mut i = fs.getattr(f.ino)?;
            i.size = 0;
            fs.put_inode(&i)?;
            fs.bt_put(&crate::format::inode::trim_key(f.ino), &[])
        })
        .unwrap();
        drop(fs);
        let mut fs = Fs::open_keeping_orphans(dev).unwrap();
        assert_eq!(fs.getattr(f.ino).unwrap().blocks, 0, "finished at open");
        assert!(
            fs.statfs().free >= free + 300,
            "every data block given back"
        );
        // Growing the file again shows zeros, not the old bytes.
        let grow = crate::fs::SetAttr {
            size: Some(300 * 8192),
            ..Default::default()
        };
        fs.setattr(f.ino, &grow).unwrap();
        assert_eq!(fs.read(f.ino, 0, 4096).unwrap(), vec![0u8; 4096]);
        let r = fs.fsck(false).unwrap();
        assert!(r.clean(), "{:?}", r.problems);
    }

    #[test]
    fn answered_requests_are_forgotten_with_the_next_change() {
        let (_dir, _dev, mut fs) = fresh();
        for seq in 1..=3 {
            fs.recorded(
                tag(seq, 1),
                |fs| fs.setxattr(1, format!("user.{seq}").as_bytes(), b"v", false, false),
                |_| Outcome::Done,
            )
            .unwrap();
        }
        // Request 1 is still in flight: all three are kept.
        for seq in 1..=3 {
            assert_eq!(
                fs.recorded_reply(42, seq).unwrap(),
                Some((Outcome::Done, 3))
            );
        }
        fs.recorded(
            tag(9, 9),
            |fs| fs.removexattr(1, b"user.1"),
            |_| Outcome::Done,
        )
        .unwrap();
        for seq in 1..=3 {
            assert_eq!(fs.recorded_reply(42, seq).unwrap(), None, "seq {seq}");
        }
        assert_eq!(fs.recorded_reply(42, 9).unwrap(), Some((Outcome::Done, 3)));
        // A mount that went away: all of its records go.
        assert_eq!(fs.forget_replies(|c| c == 42).unwrap(), 1);
        assert_eq!(fs.recorded_reply(42, 9).unwrap(), None);
        let r = fs.fsck(false).unwrap();
        assert!(r.clean(), "{:?}", r.problems);
    }
}
