//! Unit tests of [`super`].

use super::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Nodes in memory.
#[derive(Default)]
struct Mem {
    nodes: HashMap<u64, Page>,
    next: u64,
    freed: Vec<u64>,
}

impl NodeStore for Mem {
    fn node(&mut self, no: u64) -> Result<Page> {
        self.nodes
            .get(&no)
            .cloned()
            .ok_or_else(|| FsError::Corrupt(format!("no node {no}")))
    }
    fn put_node(&mut self, no: u64, image: Vec<u8>) -> Result<()> {
        self.nodes.insert(no, Arc::new(image));
        Ok(())
    }
    fn new_node(&mut self) -> Result<u64> {
        self.next += 1;
        Ok(self.next)
    }
    fn free_node(&mut self, no: u64) -> Result<()> {
        assert!(self.nodes.remove(&no).is_some(), "double free of {no}");
        self.freed.push(no);
        Ok(())
    }
}

fn key(i: u64) -> Vec<u8> {
    // Spread over the key space, with varying lengths.
    let mut k = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .to_be_bytes()
        .to_vec();
    k.extend(std::iter::repeat_n(b'k', (i % 40) as usize));
    k
}

#[test]
fn matches_a_btreemap_through_inserts_overwrites_and_deletes() {
    let mut s = Mem::default();
    let mut root = create(&mut s).unwrap();
    let mut model = BTreeMap::new();
    for i in 0..20_000u64 {
        let v = vec![(i % 251) as u8; (i % 97) as usize];
        put(&mut s, &mut root, &key(i), &v).unwrap();
        model.insert(key(i), v);
    }
    for i in (0..20_000u64).step_by(3) {
        let v = b"again".to_vec();
        put(&mut s, &mut root, &key(i), &v).unwrap();
        model.insert(key(i), v);
    }
    for i in (0..20_000u64).filter(|i| i % 5 != 0) {
        assert!(delete(&mut s, &mut root, &key(i)).unwrap());
        model.remove(&key(i));
    }
    assert!(!delete(&mut s, &mut root, &key(1)).unwrap(), "already gone");
    for i in 0..20_000u64 {
        assert_eq!(
            get(&mut s, root, &key(i)).unwrap(),
            model.get(&key(i)).cloned()
        );
    }
    let all = range(&mut s, root, &[], Bound::Unbounded, usize::MAX).unwrap();
    let want: Vec<_> = model.clone().into_iter().collect();
    assert_eq!(all, want);
    // Deleted leaves were freed: the tree holds no more nodes than it reaches.
    assert_eq!(nodes(&mut s, root).unwrap().len(), s.nodes.len());
}

#[test]
fn range_and_floor_follow_the_order() {
    let mut s = Mem::default();
    let mut root = create(&mut s).unwrap();
    for i in 0..5000u64 {
        put(&mut s, &mut root, &(i * 10).to_be_bytes(), &i.to_le_bytes()).unwrap();
    }
    let r = range(
        &mut s,
        root,
        &95u64.to_be_bytes(),
        Bound::Excluded(&200u64.to_be_bytes()),
        100,
    )
    .unwrap();
    let got: Vec<u64> = r
        .iter()
        .map(|(k, _)| u64::from_be_bytes(k[..8].try_into().unwrap()))
        .collect();
    assert_eq!(got, (10..20).map(|i| i * 10).collect::<Vec<_>>());
    let r = range(&mut s, root, &[], Bound::Unbounded, 7).unwrap();
    assert_eq!(r.len(), 7);
    let f = floor(&mut s, root, &12_345u64.to_be_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(f.0, 12_340u64.to_be_bytes());
    assert!(floor(&mut s, root, &[0, 0, 0]).unwrap().is_none());
    // Floor still works when whole leaves below were emptied.
    for i in 1000..3000u64 {
        delete(&mut s, &mut root, &(i * 10).to_be_bytes()).unwrap();
    }
    let f = floor(&mut s, root, &25_000u64.to_be_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(f.0, 9_990u64.to_be_bytes());
}

#[test]
fn deleting_everything_leaves_one_empty_root() {
    let mut s = Mem::default();
    let mut root = create(&mut s).unwrap();
    for i in 0..3000u64 {
        put(&mut s, &mut root, &key(i), &[1u8; 100]).unwrap();
    }
    for i in 0..3000u64 {
        assert!(delete(&mut s, &mut root, &key(i)).unwrap());
    }
    assert_eq!(s.nodes.len(), 1);
    assert!(range(&mut s, root, &[], Bound::Unbounded, 10)
        .unwrap()
        .is_empty());
    put(&mut s, &mut root, b"again", b"v").unwrap();
    assert_eq!(get(&mut s, root, b"again").unwrap(), Some(b"v".to_vec()));
}

#[test]
fn big_keys_and_values_split_safely_and_oversize_is_refused() {
    let mut s = Mem::default();
    let mut root = create(&mut s).unwrap();
    for i in 0..500u64 {
        let mut k = vec![b'x'; MAX_KEY - 8];
        k.extend_from_slice(&i.to_be_bytes());
        put(&mut s, &mut root, &k, &vec![7u8; MAX_VALUE]).unwrap();
    }
    assert_eq!(
        range(&mut s, root, &[], Bound::Unbounded, 1000)
            .unwrap()
            .len(),
        500
    );
    assert_eq!(
        put(&mut s, &mut root, &vec![0u8; MAX_KEY + 1], b""),
        Err(FsError::NameTooLong)
    );
    assert_eq!(
        put(&mut s, &mut root, b"k", &vec![0u8; MAX_VALUE + 1]),
        Err(FsError::Range)
    );
}
