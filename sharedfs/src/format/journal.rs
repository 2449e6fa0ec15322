//! The journal: a ring of transaction records in the volume, so that every metadata
//! change (a set of whole-block images) reaches the volume atomically.
//!
//! A record is one header block and the block images it carries:
//!
//! ```text
//! header  "SJRN" | flags u32 (1 = last record of its transaction) | seq u64 | n u32 |
//!         pad u32 | crc u32 | n x block number u64
//! images  n blocks
//! ```
//! The crc covers the header fields, the block numbers and the images, seeded with the
//! volume's uuid so that records of an earlier format of the same volume never match.
//! A transaction larger than one header holds spans several records; replay applies it
//! only when its last record is intact. Records never wrap: one that does not fit before
//! the ring's end starts at block 0. Replay follows consecutive sequence numbers from the
//! checkpoint and stops at the first record that is missing or torn.

use crate::dev::BlockDev;
use crate::error::Result;
use crate::format::layout::{BLOCK, BLOCK_U64};

const MAGIC: &[u8; 4] = b"SJRN";
const HEADER_FIXED: usize = 28;
/// Block images one header describes.
pub const MAX_PER_RECORD: usize = (BLOCK - HEADER_FIXED) / 8;
const FLAG_LAST: u32 = 1;

fn crc(salt: &[u8; 16], header: &[u8], images: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(salt);
    h.update(&header[..20]);
    h.update(&header[HEADER_FIXED..]);
    h.update(images);
    h.finalize()
}

/// One record's bytes: header and images, ready for one write.
pub fn encode_record(salt: &[u8; 16], seq: u64, last: bool, pages: &[(u64, &[u8])]) -> Vec<u8> {
    assert!(pages.len() <= MAX_PER_RECORD && !pages.is_empty());
    let mut out = Vec::with_capacity((pages.len() + 1) * BLOCK);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(if last { FLAG_LAST } else { 0 }).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // pad, crc
    for (no, _) in pages {
        out.extend_from_slice(&no.to_le_bytes());
    }
    out.resize(BLOCK, 0);
    for (_, img) in pages {
        debug_assert_eq!(img.len(), BLOCK);
        out.extend_from_slice(img);
    }
    let c = crc(salt, &out[..BLOCK], &out[BLOCK..]);
    out[24..28].copy_from_slice(&c.to_le_bytes());
    out
}

/// What replay found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Complete transactions in order; each is the block images it wrote.
    pub transactions: Vec<Vec<(u64, Vec<u8>)>>,
    /// Where the next record goes, and its sequence number.
    pub end_pos: u64,
    pub next_seq: u64,
}

/// A record: whether it ends its transaction, and its block images.
type Record = (bool, Vec<(u64, Vec<u8>)>);

/// Reads a record at `pos` if it is intact and carries `seq`.
fn read_record(
    dev: &dyn BlockDev,
    start: u64,
    blocks: u64,
    pos: u64,
    seq: u64,
    salt: &[u8; 16],
) -> Result<Option<Record>> {
    if pos >= blocks {
        return Ok(None);
    }
    let header = dev.read_at((start + pos) * BLOCK_U64, BLOCK)?;
    if &header[..4] != MAGIC {
        return Ok(None);
    }
    let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let rseq = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let n = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
    if rseq != seq || n == 0 || n > MAX_PER_RECORD || pos + 1 + n as u64 > blocks {
        return Ok(None);
    }
    let images = dev.read_at((start + pos + 1) * BLOCK_U64, n * BLOCK)?;
    let want = u32::from_le_bytes(header[24..28].try_into().unwrap());
    if crc(salt, &header, &images) != want {
        return Ok(None);
    }
    let pages = (0..n)
        .map(|i| {
            let at = HEADER_FIXED + i * 8;
            let no = u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
            (no, images[i * BLOCK..(i + 1) * BLOCK].to_vec())
        })
        .collect();
    Ok(Some((flags & FLAG_LAST != 0, pages)))
}

/// Follows the ring from (`pos`, `seq`) and returns every complete transaction.
pub fn scan(
    dev: &dyn BlockDev,
    start: u64,
    blocks: u64,
    mut pos: u64,
    mut seq: u64,
    salt: &[u8; 16],
) -> Result<Scan> {
    let mut out = Scan::default();
    let mut group: Vec<(u64, Vec<u8>)> = Vec::new();
    // Where the last complete transaction ended: a torn multi-record transaction is
    // overwritten by the next one.
    let (mut end_pos, mut next_seq) = (pos, seq);
    // At most one lap of the ring.
    let mut walked = 0u64;
    while walked <= blocks {
        let mut rec = read_record(dev, start, blocks, pos, seq, salt)?;
        if rec.is_none() && pos != 0 {
            // The writer wraps a record that does not fit before the ring's end.
            if let Some(r) = read_record(dev, start, blocks, 0, seq, salt)? {
                walked += blocks - pos;
                pos = 0;
                rec = Some(r);
            }
        }
        let Some((last, pages)) = rec else { break };
        let n = pages.len() as u64;
        group.extend(pages);
        pos += 1 + n;
        walked += 1 + n;
        seq += 1;
        if last {
            out.transactions.push(std::mem::take(&mut group));
            end_pos = pos;
            next_seq = seq;
        }
    }
    out.end_pos = end_pos;
    out.next_seq = next_seq;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::FileDev;

    const SALT: [u8; 16] = [3; 16];

    fn page(b: u8) -> Vec<u8> {
        vec![b; BLOCK]
    }

    fn dev(dir: &tempfile::TempDir) -> FileDev {
        FileDev::create(&dir.path().join("dev"), 64 * BLOCK_U64).unwrap()
    }

    fn put(dev: &FileDev, pos: u64, rec: &[u8]) {
        dev.write_at(pos * BLOCK_U64, rec).unwrap();
    }

    #[test]
    fn replays_complete_transactions_in_order() {
        let d = tempfile::tempdir().unwrap();
        let dev = dev(&d);
        let (p1, p2) = (page(1), page(2));
        put(
            &dev,
            0,
            &encode_record(&SALT, 5, true, &[(10, &p1), (11, &p2)]),
        );
        put(&dev, 3, &encode_record(&SALT, 6, true, &[(10, &p2)]));
        let s = scan(&dev, 0, 64, 0, 5, &SALT).unwrap();
        assert_eq!(s.transactions.len(), 2);
        assert_eq!(s.transactions[1], vec![(10, p2.clone())]);
        assert_eq!((s.end_pos, s.next_seq), (5, 7));
        // Starting after the first record replays only the second.
        let s = scan(&dev, 0, 64, 3, 6, &SALT).unwrap();
        assert_eq!(s.transactions.len(), 1);
    }

    #[test]
    fn a_torn_tail_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let dev = dev(&d);
        let p = page(9);
        put(&dev, 0, &encode_record(&SALT, 1, true, &[(10, &p)]));
        let mut torn = encode_record(&SALT, 2, true, &[(11, &p), (12, &p)]);
        // The second image never reached the disk.
        torn.truncate(2 * BLOCK);
        torn.extend_from_slice(&[0u8; BLOCK]);
        put(&dev, 2, &torn);
        let s = scan(&dev, 0, 64, 0, 1, &SALT).unwrap();
        assert_eq!(s.transactions.len(), 1);
        assert_eq!(
            (s.end_pos, s.next_seq),
            (2, 2),
            "next record overwrites the torn one"
        );
    }

    #[test]
    fn a_transaction_without_its_last_record_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let dev = dev(&d);
        let p = page(4);
        put(&dev, 0, &encode_record(&SALT, 1, false, &[(10, &p)]));
        let s = scan(&dev, 0, 64, 0, 1, &SALT).unwrap();
        assert!(s.transactions.is_empty());
        assert_eq!((s.end_pos, s.next_seq), (0, 1));
        put(&dev, 2, &encode_record(&SALT, 2, true, &[(11, &p)]));
        let s = scan(&dev, 0, 64, 0, 1, &SALT).unwrap();
        assert_eq!(s.transactions, vec![vec![(10, p.clone()), (11, p.clone())]]);
    }

    #[test]
    fn follows_a_wrap_and_ignores_stale_and_foreign_records() {
        let d = tempfile::tempdir().unwrap();
        let dev = dev(&d);
        let p = page(7);
        // A stale record from an earlier lap sits at 0 with an old sequence number,
        // and a record of another format (other salt) with the right one at 62.
        put(&dev, 0, &encode_record(&SALT, 3, true, &[(1, &p)]));
        put(&dev, 62, &encode_record(&[0; 16], 40, true, &[(1, &p)]));
        put(&dev, 60, &encode_record(&SALT, 40, true, &[(2, &p)]));
        // 41 did not fit at 62 (needs 3 blocks of 2 left), so it went to 0.
        put(
            &dev,
            0,
            &encode_record(&SALT, 41, true, &[(3, &p), (4, &p)]),
        );
        let s = scan(&dev, 0, 64, 60, 40, &SALT).unwrap();
        let got: Vec<u64> = s.transactions.iter().flatten().map(|(n, _)| *n).collect();
        assert_eq!(got, vec![2, 3, 4]);
        assert_eq!((s.end_pos, s.next_seq), (3, 42));
    }
}
