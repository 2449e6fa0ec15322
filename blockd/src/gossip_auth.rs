//! Authenticated gossip packets: a MAC keyed from the cluster secret, a timestamp and
//! a nonce, so a forged packet, one from another cluster, a replay and a packet
//! altered on the way are all dropped before foca sees them.
//!
//! A packet is `version (1) | unix millis (8) | nonce (8) | payload | mac (16)`, the
//! MAC being HMAC-SHA256 over everything before it, truncated to 128 bits. The key is
//! derived from the cluster id and secret apart from the gRPC token, so nothing that
//! travels in gossip reveals the token. A receiver accepts a packet only within
//! [`WINDOW`] of its own clock and only once (it remembers the MACs it accepted within
//! the window): a captured packet cannot be sent again to bring a dead node back or
//! to declare a live one dead. Clocks of the nodes must agree within the window.
//!
//! Pure logic, time passed in; the socket tasks are in [`crate::membership`].

use std::collections::{HashSet, VecDeque};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 8;
const MAC_LEN: usize = 16;
/// Bytes a sealed packet adds to its payload.
pub const OVERHEAD: usize = HEADER + MAC_LEN;
/// How far a packet's timestamp may be from the receiver's clock, in milliseconds.
pub const WINDOW: u64 = 30_000;
/// MACs remembered at most (a flood from a member that holds the key cannot grow the
/// set without bound; past this, the oldest are forgotten and packets older than the
/// newest forgotten one are dropped).
const SEEN_MAX: usize = 200_000;

type HmacSha256 = Hmac<Sha256>;

/// The gossip key of a cluster: derived from its id and secret, distinct from the
/// gRPC token (which is derived from the same with another label).
pub fn gossip_key(cluster_id: &str, secret: &str) -> [u8; 32] {
    Sha256::digest(format!("shoal-gossip\0{cluster_id}\0{secret}")).into()
}

fn mac(key: &[u8; 32], body: &[u8]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Wraps `payload` for sending at `now_ms` (unix millis) with a fresh random `nonce`.
pub fn seal(key: &[u8; 32], now_ms: u64, nonce: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(&nonce.to_be_bytes());
    out.extend_from_slice(payload);
    let tag = mac(key, out);
    out.extend_from_slice(&tag);
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Too short, or an unknown version.
    Malformed,
    /// The MAC does not match: another cluster, a stranger, or altered on the way.
    BadMac,
    /// Its timestamp is outside the window (a replay of an old packet, or a clock off).
    OutOfWindow,
    /// Accepted once already.
    Replay,
}

/// The receiving side: checks packets and remembers the ones it accepted.
pub struct Opener {
    key: [u8; 32],
    seen: HashSet<[u8; MAC_LEN]>,
    /// Accepted MACs with their packet time, oldest first.
    order: VecDeque<(u64, [u8; MAC_LEN])>,
    /// Packets at or before this time are refused: their MACs may have been forgotten.
    floor: u64,
}

impl Opener {
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key,
            seen: HashSet::new(),
            order: VecDeque::new(),
            floor: 0,
        }
    }

    /// The payload of `packet` received at `now_ms`, or why it is dropped.
    pub fn open<'a>(&mut self, packet: &'a [u8], now_ms: u64) -> Result<&'a [u8], Dropped> {
        if packet.len() < OVERHEAD || packet[0] != VERSION {
            return Err(Dropped::Malformed);
        }
        let (body, tag) = packet.split_at(packet.len() - MAC_LEN);
        let want = mac(&self.key, body);
        // Constant time: the comparison must not tell a forger how much was right.
        if !constant_time_eq(&want, tag) {
            return Err(Dropped::BadMac);
        }
        let sent = u64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
        if sent.abs_diff(now_ms) > WINDOW || sent <= self.floor {
            return Err(Dropped::OutOfWindow);
        }
        self.forget_before(now_ms.saturating_sub(WINDOW));
        if !self.seen.insert(want) {
            return Err(Dropped::Replay);
        }
        self.order.push_back((sent, want));
        while self.order.len() > SEEN_MAX {
            if let Some((t, m)) = self.order.pop_front() {
                self.seen.remove(&m);
                self.floor = self.floor.max(t);
            }
        }
        Ok(&body[HEADER..])
    }

    /// Forgets MACs of packets sent before `t`: the window refuses those anyway.
    fn forget_before(&mut self, t: u64) {
        // Packets arrive roughly in time order; one late straggler at the front only
        // delays forgetting, it never forgets a packet still inside the window.
        while let Some(&(sent, m)) = self.order.front() {
            if sent >= t {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&m);
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn sealed(key: &[u8; 32], now: u64, nonce: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal(key, now, nonce, payload, &mut out);
        out
    }

    #[test]
    fn a_member_packet_opens_once() {
        let key = gossip_key("c1", "s3cret");
        let mut o = Opener::new(key);
        let p = sealed(&key, T, 7, b"ping");
        assert_eq!(o.open(&p, T + 5).unwrap(), b"ping");
        assert_eq!(o.open(&p, T + 10), Err(Dropped::Replay), "replayed");
        // The same payload sent again by the member has a new nonce: accepted.
        let again = sealed(&key, T + 1, 8, b"ping");
        assert_eq!(o.open(&again, T + 10).unwrap(), b"ping");
    }

    #[test]
    fn strangers_other_clusters_and_tampering_are_dropped() {
        let key = gossip_key("c1", "s3cret");
        let mut o = Opener::new(key);
        let other = sealed(&gossip_key("c1", "other"), T, 1, b"x");
        assert_eq!(o.open(&other, T), Err(Dropped::BadMac));
        let other_cluster = sealed(&gossip_key("c2", "s3cret"), T, 1, b"x");
        assert_eq!(o.open(&other_cluster, T), Err(Dropped::BadMac));
        let mut p = sealed(&key, T, 1, b"suspect node-a");
        p[HEADER] ^= 1;
        assert_eq!(o.open(&p, T), Err(Dropped::BadMac), "altered payload");
        let mut p = sealed(&key, T, 1, b"x");
        p[2] ^= 1;
        assert_eq!(o.open(&p, T), Err(Dropped::BadMac), "altered time");
        assert_eq!(o.open(&[VERSION; 10], T), Err(Dropped::Malformed));
        let mut p = sealed(&key, T, 1, b"x");
        p[0] = 9;
        assert_eq!(o.open(&p, T), Err(Dropped::Malformed), "unknown version");
    }

    #[test]
    fn the_gossip_key_reveals_nothing_of_the_grpc_token() {
        let key = gossip_key("c1", "s3cret");
        let token = crate::peers::cluster_token("c1", "s3cret");
        assert!(!token.contains(&hex::encode(&key[..8])));
        assert_ne!(hex::encode(key), token);
    }

    #[test]
    fn old_and_future_packets_are_dropped() {
        let key = gossip_key("c1", "s");
        let mut o = Opener::new(key);
        let old = sealed(&key, T - WINDOW - 1, 1, b"x");
        assert_eq!(o.open(&old, T), Err(Dropped::OutOfWindow));
        let future = sealed(&key, T + WINDOW + 1, 2, b"x");
        assert_eq!(o.open(&future, T), Err(Dropped::OutOfWindow));
        let edge = sealed(&key, T - WINDOW, 3, b"x");
        assert!(o.open(&edge, T).is_ok());
    }

    #[test]
    fn remembered_macs_are_forgotten_after_the_window_and_replays_stay_dropped() {
        let key = gossip_key("c1", "s");
        let mut o = Opener::new(key);
        let p = sealed(&key, T, 1, b"x");
        o.open(&p, T).unwrap();
        // Much later: the MAC is forgotten, and the window refuses the replay instead.
        let q = sealed(&key, T + 2 * WINDOW, 2, b"y");
        o.open(&q, T + 2 * WINDOW).unwrap();
        assert_eq!(
            o.seen.len(),
            1,
            "only the packet inside the window is remembered"
        );
        assert_eq!(o.open(&p, T + 2 * WINDOW), Err(Dropped::OutOfWindow));
    }

    #[test]
    fn a_flood_cannot_grow_the_memory_without_bound() {
        let key = gossip_key("c1", "s");
        let mut o = Opener::new(key);
        let mut first = Vec::new();
        for i in 0..(SEEN_MAX as u64 + 10) {
            let p = sealed(&key, T + i / 1000, i, b"x");
            if i == 0 {
                first = p.clone();
            }
            o.open(&p, T + i / 1000).unwrap();
        }
        assert!(o.seen.len() <= SEEN_MAX);
        assert_eq!(
            o.open(&first, T + 300),
            Err(Dropped::OutOfWindow),
            "a forgotten packet is still refused"
        );
    }
}
