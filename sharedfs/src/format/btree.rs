//! A B+tree of byte-string keys and values in 4 KiB blocks: the one ordered map that
//! holds every namespace record (inodes, directory entries, extents, xattrs).
//!
//! A node is one block:
//!
//! ```text
//! leaf      kind=1 u8 | n u16 | pad | n x (klen u16, vlen u16, key, value)
//! internal  kind=2 u8 | n u16 | pad | child0 u64 | n x (klen u16, key, child u64)
//! ```
//! In an internal node, `child0` holds keys below the first key and the child after
//! key i holds keys from key i up to key i+1. Nodes split when their encoding outgrows
//! a block; deletes free nodes that become empty but do not rebalance (an underfull
//! node costs space, never correctness). Every change goes through a [`NodeStore`],
//! which in the filesystem is a journaled transaction, so a change of several nodes is
//! atomic.

use std::ops::Bound;

use crate::error::{FsError, Result};
use crate::format::layout::BLOCK;
use crate::format::pages::Page;

pub const MAX_KEY: usize = 512;
pub const MAX_VALUE: usize = 1536;
const HEADER: usize = 8;
const LEAF: u8 = 1;
const INTERNAL: u8 = 2;

/// Where the tree's nodes live.
pub trait NodeStore {
    fn node(&mut self, no: u64) -> Result<Page>;
    fn put_node(&mut self, no: u64, image: Vec<u8>) -> Result<()>;
    fn new_node(&mut self) -> Result<u64>;
    fn free_node(&mut self, no: u64) -> Result<()>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Leaf {
        keys: Vec<Vec<u8>>,
        vals: Vec<Vec<u8>>,
    },
    Internal {
        keys: Vec<Vec<u8>>,
        children: Vec<u64>,
    },
}

fn corrupt(no: u64, what: &str) -> FsError {
    FsError::Corrupt(format!("B-tree node {no}: {what}"))
}

impl Node {
    fn decode(no: u64, b: &[u8]) -> Result<Node> {
        let n = u16::from_le_bytes([b[1], b[2]]) as usize;
        let mut at = HEADER;
        let mut take = |len: usize| -> Result<&[u8]> {
            let s = b
                .get(at..at + len)
                .ok_or_else(|| corrupt(no, "entry past the end"))?;
            at += len;
            Ok(s)
        };
        let u16_ = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]) as usize;
        match b[0] {
            LEAF => {
                let (mut keys, mut vals) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for _ in 0..n {
                    let kl = u16_(take(2)?);
                    let vl = u16_(take(2)?);
                    keys.push(take(kl)?.to_vec());
                    vals.push(take(vl)?.to_vec());
                }
                Ok(Node::Leaf { keys, vals })
            }
            INTERNAL => {
                let mut children = Vec::with_capacity(n + 1);
                let mut keys = Vec::with_capacity(n);
                children.push(u64::from_le_bytes(take(8)?.try_into().unwrap()));
                for _ in 0..n {
                    let kl = u16_(take(2)?);
                    keys.push(take(kl)?.to_vec());
                    children.push(u64::from_le_bytes(take(8)?.try_into().unwrap()));
                }
                Ok(Node::Internal { keys, children })
            }
            k => Err(corrupt(no, &format!("kind {k}"))),
        }
    }

    fn size(&self) -> usize {
        match self {
            Node::Leaf { keys, vals } => {
                HEADER
                    + keys
                        .iter()
                        .zip(vals)
                        .map(|(k, v)| 4 + k.len() + v.len())
                        .sum::<usize>()
            }
            Node::Internal { keys, .. } => {
                HEADER + 8 + keys.iter().map(|k| 10 + k.len()).sum::<usize>()
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK);
        match self {
            Node::Leaf { keys, vals } => {
                b.push(LEAF);
                b.extend_from_slice(&(keys.len() as u16).to_le_bytes());
                b.resize(HEADER, 0);
                for (k, v) in keys.iter().zip(vals) {
                    b.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    b.extend_from_slice(&(v.len() as u16).to_le_bytes());
                    b.extend_from_slice(k);
                    b.extend_from_slice(v);
                }
            }
            Node::Internal { keys, children } => {
                b.push(INTERNAL);
                b.extend_from_slice(&(keys.len() as u16).to_le_bytes());
                b.resize(HEADER, 0);
                b.extend_from_slice(&children[0].to_le_bytes());
                for (k, c) in keys.iter().zip(&children[1..]) {
                    b.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    b.extend_from_slice(k);
                    b.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
        debug_assert!(b.len() <= BLOCK);
        b.resize(BLOCK, 0);
        b
    }
}

/// One step down the tree, read straight from a node's encoding (no decoding, no
/// allocation: lookups are the namespace's hottest path).
enum Step {
    /// A leaf: the entry stored under the key, if any.
    Leaf(Option<LeafEntry>),
    /// An internal node: the child that holds the key.
    Child(u64),
}

/// Where one leaf entry sits in a node's encoding.
#[derive(Debug, Clone)]
struct LeafEntry {
    /// Offset of its header (key and value lengths).
    at: usize,
    key: std::ops::Range<usize>,
    /// Its value; the entry ends where the value does.
    value: std::ops::Range<usize>,
}

/// The u16 at `at` in node `no`'s encoding `b`.
fn u16_in(no: u64, b: &[u8], at: usize) -> Result<usize> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| corrupt(no, "entry past the end"))
}

/// The entries of leaf `no`'s encoding `b`, in key order, read in place (the walk
/// stops being meaningful after the first error, which callers return).
fn leaf_entries(no: u64, b: &[u8]) -> impl Iterator<Item = Result<LeafEntry>> + '_ {
    let n = u16::from_le_bytes([b[1], b[2]]) as usize;
    let mut at = HEADER;
    (0..n).map(move |_| {
        let (kl, vl) = (u16_in(no, b, at)?, u16_in(no, b, at + 2)?);
        let key = at + 4..at + 4 + kl;
        let value = key.end..key.end + vl;
        if value.end > b.len() {
            return Err(corrupt(no, "entry past the end"));
        }
        let e = LeafEntry { at, key, value };
        at = e.value.end;
        Ok(e)
    })
}

fn step(no: u64, b: &[u8], key: &[u8]) -> Result<Step> {
    match b[0] {
        LEAF => {
            for e in leaf_entries(no, b) {
                let e = e?;
                match b[e.key.clone()].cmp(key) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return Ok(Step::Leaf(Some(e))),
                    std::cmp::Ordering::Greater => break,
                }
            }
            Ok(Step::Leaf(None))
        }
        INTERNAL => {
            let n = u16::from_le_bytes([b[1], b[2]]) as usize;
            let bad = || corrupt(no, "entry past the end");
            let child = |at: usize| -> Result<u64> {
                b.get(at..at + 8)
                    .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
                    .ok_or_else(bad)
            };
            let mut at = HEADER;
            let mut c = child(at)?;
            at += 8;
            for _ in 0..n {
                let kl = u16_in(no, b, at)?;
                let k = b.get(at + 2..at + 2 + kl).ok_or_else(bad)?;
                if k > key {
                    break;
                }
                c = child(at + 2 + kl)?;
                at += 2 + kl + 8;
            }
            Ok(Step::Child(c))
        }
        k => Err(corrupt(no, &format!("kind {k}"))),
    }
}

/// Puts `key` = `val` into a leaf's encoding in place of decoding it: Some(new image)
/// when the leaf still fits in a block, None when it must split (the caller decodes).
fn splice_leaf(no: u64, b: &[u8], key: &[u8], val: &[u8]) -> Result<Option<Vec<u8>>> {
    let n = u16::from_le_bytes([b[1], b[2]]);
    // Where the entries end, and the byte range the new entry replaces (empty: an insert).
    let (mut used, mut replaced) = (HEADER, None);
    for e in leaf_entries(no, b) {
        let e = e?;
        if replaced.is_none() {
            match b[e.key.clone()].cmp(key) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => replaced = Some(e.at..e.value.end),
                std::cmp::Ordering::Greater => replaced = Some(e.at..e.at),
            }
        }
        used = e.value.end;
    }
    let replaced = replaced.unwrap_or(used..used);
    let replaces = !replaced.is_empty();
    if used - replaced.len() + 4 + key.len() + val.len() > BLOCK {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&b[..replaced.start]);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(val.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(val);
    out.extend_from_slice(&b[replaced.end..used]);
    let count = if replaces { n } else { n + 1 };
    out[1..3].copy_from_slice(&count.to_le_bytes());
    out.resize(BLOCK, 0);
    Ok(Some(out))
}

fn load(s: &mut dyn NodeStore, no: u64) -> Result<Node> {
    let p = s.node(no)?;
    Node::decode(no, &p)
}

fn store(s: &mut dyn NodeStore, no: u64, n: &Node) -> Result<()> {
    s.put_node(no, n.encode())
}

/// Index of the child that holds `key`.
fn child_index(keys: &[Vec<u8>], key: &[u8]) -> usize {
    keys.partition_point(|k| k.as_slice() <= key)
}

/// Makes an empty tree; returns its root.
pub fn create(s: &mut dyn NodeStore) -> Result<u64> {
    let root = s.new_node()?;
    store(
        s,
        root,
        &Node::Leaf {
            keys: vec![],
            vals: vec![],
        },
    )?;
    Ok(root)
}

pub fn get(s: &mut dyn NodeStore, root: u64, key: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut no = root;
    for _ in 0..64 {
        let page = s.node(no)?;
        match step(no, &page, key)? {
            Step::Leaf(found) => return Ok(found.map(|e| page[e.value].to_vec())),
            Step::Child(c) => no = c,
        }
    }
    Err(corrupt(root, "deeper than 64 levels (a cycle?)"))
}

fn check_sizes(key: &[u8], val: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(FsError::NameTooLong);
    }
    if val.len() > MAX_VALUE {
        return Err(FsError::Range);
    }
    Ok(())
}

/// Inserts or replaces; `root` changes when the root splits.
pub fn put(s: &mut dyn NodeStore, root: &mut u64, key: &[u8], val: &[u8]) -> Result<()> {
    check_sizes(key, val)?;
    if let Some((sep, right)) = insert(s, *root, key, val, 0)? {
        let new_root = s.new_node()?;
        store(
            s,
            new_root,
            &Node::Internal {
                keys: vec![sep],
                children: vec![*root, right],
            },
        )?;
        *root = new_root;
    }
    Ok(())
}

/// Where a node of `sizes` (per entry) splits: the first index of the right half.
fn split_point(sizes: &[usize]) -> usize {
    let total: usize = sizes.iter().sum();
    let mut acc = 0;
    for (i, s) in sizes.iter().enumerate() {
        acc += s;
        if acc * 2 >= total {
            return (i + 1).clamp(1, sizes.len() - 1);
        }
    }
    sizes.len() / 2
}

fn insert(
    s: &mut dyn NodeStore,
    no: u64,
    key: &[u8],
    val: &[u8],
    depth: u32,
) -> Result<Option<(Vec<u8>, u64)>> {
    if depth > 64 {
        return Err(corrupt(no, "deeper than 64 levels (a cycle?)"));
    }
    // The common cases touch the encoding only: going down, and a leaf that still fits.
    let page = s.node(no)?;
    match step(no, &page, key)? {
        Step::Leaf(_) => {
            if let Some(image) = splice_leaf(no, &page, key, val)? {
                s.put_node(no, image)?;
                return Ok(None);
            }
        }
        Step::Child(c) => {
            drop(page);
            match insert(s, c, key, val, depth + 1)? {
                None => return Ok(None),
                Some(split) => return insert_split(s, no, split),
            }
        }
    }
    drop(page);
    let mut node = load(s, no)?;
    match &mut node {
        Node::Leaf { keys, vals } => match keys.binary_search_by(|k| k.as_slice().cmp(key)) {
            Ok(i) => vals[i] = val.to_vec(),
            Err(i) => {
                keys.insert(i, key.to_vec());
                vals.insert(i, val.to_vec());
            }
        },
        Node::Internal { .. } => unreachable!("internal nodes take the path above"),
    }
    finish_insert(s, no, node)
}

/// A child of internal node `no` split: add its separator and right half here.
fn insert_split(
    s: &mut dyn NodeStore,
    no: u64,
    (sep, right): (Vec<u8>, u64),
) -> Result<Option<(Vec<u8>, u64)>> {
    let mut node = load(s, no)?;
    let Node::Internal { keys, children } = &mut node else {
        return Err(corrupt(no, "a leaf where an internal node was"));
    };
    let i = child_index(keys, &sep);
    keys.insert(i, sep);
    children.insert(i + 1, right);
    finish_insert(s, no, node)
}

/// Stores a changed node, splitting it when it outgrew its block.
fn finish_insert(s: &mut dyn NodeStore, no: u64, node: Node) -> Result<Option<(Vec<u8>, u64)>> {
    if node.size() <= BLOCK {
        store(s, no, &node)?;
        return Ok(None);
    }
    let right_no = s.new_node()?;
    let (left, right, sep) = match node {
        Node::Leaf { mut keys, mut vals } => {
            let sizes: Vec<usize> = keys
                .iter()
                .zip(&vals)
                .map(|(k, v)| 4 + k.len() + v.len())
                .collect();
            let m = split_point(&sizes);
            let rk = keys.split_off(m);
            let rv = vals.split_off(m);
            let sep = rk[0].clone();
            (
                Node::Leaf { keys, vals },
                Node::Leaf { keys: rk, vals: rv },
                sep,
            )
        }
        Node::Internal {
            mut keys,
            mut children,
        } => {
            let sizes: Vec<usize> = keys.iter().map(|k| 10 + k.len()).collect();
            let m = split_point(&sizes);
            // Key m moves up; the right node starts with child m+1.
            let mut rk = keys.split_off(m);
            let sep = rk.remove(0);
            let rc = children.split_off(m + 1);
            (
                Node::Internal { keys, children },
                Node::Internal {
                    keys: rk,
                    children: rc,
                },
                sep,
            )
        }
    };
    store(s, no, &left)?;
    store(s, right_no, &right)?;
    Ok(Some((sep, right_no)))
}

/// Removes `key`; returns whether it was there. `root` changes when the tree shrinks.
pub fn delete(s: &mut dyn NodeStore, root: &mut u64, key: &[u8]) -> Result<bool> {
    let (found, _empty) = remove(s, *root, key, true, 0)?;
    // A root with one child and no keys hands over to the child.
    loop {
        match load(s, *root)? {
            Node::Internal { keys, children } if keys.is_empty() && children.len() == 1 => {
                s.free_node(*root)?;
                *root = children[0];
            }
            _ => break,
        }
    }
    Ok(found)
}

/// Returns (found, node now empty). An empty non-root node is freed by its parent.
fn remove(
    s: &mut dyn NodeStore,
    no: u64,
    key: &[u8],
    is_root: bool,
    depth: u32,
) -> Result<(bool, bool)> {
    if depth > 64 {
        return Err(corrupt(no, "deeper than 64 levels (a cycle?)"));
    }
    // The common cases read the encoding only: going down, a missing key, and a leaf
    // that keeps other entries (cut out of its image).
    let page = s.node(no)?;
    match step(no, &page, key)? {
        Step::Leaf(None) => return Ok((false, false)),
        Step::Leaf(Some(e)) => {
            let n = u16::from_le_bytes([page[1], page[2]]);
            if n > 1 {
                let mut out = Vec::with_capacity(BLOCK);
                out.extend_from_slice(&page[..e.at]);
                out.extend_from_slice(&page[e.value.end..]);
                out[1..3].copy_from_slice(&(n - 1).to_le_bytes());
                out.resize(BLOCK, 0);
                s.put_node(no, out)?;
                return Ok((true, false));
            }
        }
        Step::Child(c) => {
            let (f, child_empty) = remove(s, c, key, false, depth + 1)?;
            if !child_empty {
                return Ok((f, false));
            }
        }
    }
    drop(page);
    let mut node = load(s, no)?;
    let found;
    let empty;
    match &mut node {
        Node::Leaf { keys, vals } => match keys.binary_search_by(|k| k.as_slice().cmp(key)) {
            Ok(i) => {
                keys.remove(i);
                vals.remove(i);
                found = true;
                empty = keys.is_empty();
            }
            Err(_) => return Ok((false, false)),
        },
        Node::Internal { keys, children } => {
            // The child under `key` just became empty (found above).
            let i = child_index(keys, key);
            found = true;
            s.free_node(children[i])?;
            children.remove(i);
            if i == 0 {
                if !keys.is_empty() {
                    keys.remove(0);
                }
            } else {
                keys.remove(i - 1);
            }
            empty = children.is_empty();
        }
    }
    if empty && is_root {
        // The root stays, as an empty leaf.
        store(
            s,
            no,
            &Node::Leaf {
                keys: vec![],
                vals: vec![],
            },
        )?;
        return Ok((found, false));
    }
    if !empty {
        store(s, no, &node)?;
    }
    Ok((found, empty))
}

/// Entries with `from <= key` and key within `to`, ascending, at most `limit`.
pub fn range(
    s: &mut dyn NodeStore,
    root: u64,
    from: &[u8],
    to: Bound<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    collect(s, root, from, to, limit, &mut out, 0)?;
    Ok(out)
}

fn within(key: &[u8], to: Bound<&[u8]>) -> bool {
    match to {
        Bound::Unbounded => true,
        Bound::Included(t) => key <= t,
        Bound::Excluded(t) => key < t,
    }
}

/// Returns false once the scan is done (limit reached or past `to`).
fn collect(
    s: &mut dyn NodeStore,
    no: u64,
    from: &[u8],
    to: Bound<&[u8]>,
    limit: usize,
    out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    depth: u32,
) -> Result<bool> {
    if depth > 64 {
        return Err(corrupt(no, "deeper than 64 levels (a cycle?)"));
    }
    match load(s, no)? {
        Node::Leaf { keys, vals } => {
            let start = keys.partition_point(|k| k.as_slice() < from);
            for (k, v) in keys.into_iter().zip(vals).skip(start) {
                if !within(&k, to) {
                    return Ok(false);
                }
                if out.len() >= limit {
                    return Ok(false);
                }
                out.push((k, v));
            }
            Ok(out.len() < limit)
        }
        Node::Internal { keys, children } => {
            let first = child_index(&keys, from);
            for (i, c) in children.iter().enumerate().skip(first) {
                if i > 0 && !within(&keys[i - 1], to) {
                    return Ok(false);
                }
                if !collect(s, *c, from, to, limit, out, depth + 1)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    }
}

/// The entry with the greatest key `<= key`.
pub fn floor(s: &mut dyn NodeStore, root: u64, key: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    floor_in(s, root, Some(key), 0)
}

/// `key` None means the node's last entry.
fn floor_in(
    s: &mut dyn NodeStore,
    no: u64,
    key: Option<&[u8]>,
    depth: u32,
) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    if depth > 64 {
        return Err(corrupt(no, "deeper than 64 levels (a cycle?)"));
    }
    match load(s, no)? {
        Node::Leaf { mut keys, mut vals } => {
            let n = match key {
                Some(k) => keys.partition_point(|x| x.as_slice() <= k),
                None => keys.len(),
            };
            if n == 0 {
                return Ok(None);
            }
            Ok(Some((keys.swap_remove(n - 1), vals.swap_remove(n - 1))))
        }
        Node::Internal { keys, children } => {
            let i = match key {
                Some(k) => child_index(&keys, k),
                None => children.len() - 1,
            };
            if let Some(e) = floor_in(s, children[i], key, depth + 1)? {
                return Ok(Some(e));
            }
            // Deletes can leave a child whose entries all lie above its separator.
            for j in (0..i).rev() {
                if let Some(e) = floor_in(s, children[j], None, depth + 1)? {
                    return Ok(Some(e));
                }
            }
            Ok(None)
        }
    }
}

/// Every node of the tree (for fsck and accounting).
pub fn nodes(s: &mut dyn NodeStore, root: u64) -> Result<Vec<u64>> {
    let mut out = vec![];
    let mut stack = vec![(root, 0u32)];
    while let Some((no, depth)) = stack.pop() {
        if depth > 64 {
            return Err(corrupt(no, "deeper than 64 levels (a cycle?)"));
        }
        out.push(no);
        if let Node::Internal { children, .. } = load(s, no)? {
            stack.extend(children.into_iter().map(|c| (c, depth + 1)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
