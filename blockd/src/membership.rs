//! Cluster membership by SWIM gossip: foca over UDP.
//!
//! foca is sans-IO; this module is the thin runtime around it: one task owns the foca
//! state machine and is fed received packets, timer events and announce requests over
//! a channel; a timer task delivers foca's timers in order; a socket task receives.
//! Every packet is sealed with a MAC keyed from the cluster secret, a timestamp and a
//! nonce ([`crate::gossip_auth`]): packets from another cluster or a stranger, altered
//! or replayed ones are dropped before foca sees them.
//!
//! The live set (node id → gossip address) is published behind a lock for the rest of
//! the node: `status` and placement ask [`Membership::is_online`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use foca::{Config, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::gossip_auth::{self, Dropped, Opener};

/// Unix time in milliseconds: the clock gossip packets are stamped with.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node's identity in gossip. `bump` (start time) lets a restarted node win over its
/// previous incarnation at the same address.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GossipId {
    pub node: String,
    pub addr: SocketAddr,
    pub bump: u64,
}

impl std::fmt::Debug for GossipId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.node, self.addr, self.bump)
    }
}

impl foca::Identity for GossipId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

enum Input {
    Data(Bytes),
    Timer(Timer<GossipId>),
    Announce(SocketAddr),
    Leave,
}

/// Handle to the running membership service.
#[derive(Clone)]
pub struct Membership {
    self_id: String,
    live: Arc<RwLock<HashMap<String, SocketAddr>>>,
    tx: mpsc::Sender<Input>,
}

impl Membership {
    /// Binds the gossip socket and starts the service.
    pub async fn start(node_id: &str, bind: SocketAddr, key: [u8; 32]) -> Result<Self> {
        let socket = UdpSocket::bind(bind).await.map_err(|e| {
            Error::InvalidArgument(format!("gossip address {bind}: cannot bind: {e}"))
        })?;
        let socket = Arc::new(socket);
        let bump = unix_ms();
        let identity = GossipId {
            node: node_id.to_string(),
            addr: bind,
            bump,
        };
        let mut config = Config::new_lan(NonZeroU32::new(8).expect("nonzero"));
        // Forget a dead member soon so its restart is seen as a fresh join.
        config.remove_down_after = Some(Duration::from_secs(15));
        let max_packet = config.max_packet_size.get();
        let rng: StdRng = rand::make_rng();
        let foca = Foca::new(identity, config, rng, PostcardCodec);

        let (tx, rx) = mpsc::channel::<Input>(1024);
        let (timer_tx, timer_rx) = mpsc::unbounded_channel();
        let live = Arc::new(RwLock::new(HashMap::new()));

        tokio::spawn(run_timers(timer_rx, tx.clone()));
        tokio::spawn(run_receiver(
            socket.clone(),
            Opener::new(key),
            max_packet,
            tx.clone(),
        ));
        tokio::spawn(run_foca(foca, rx, socket, key, timer_tx, live.clone()));

        Ok(Self {
            self_id: node_id.to_string(),
            live,
            tx,
        })
    }

    /// Whether `node` is alive as far as this node knows (this node always is).
    pub fn is_online(&self, node: &str) -> bool {
        node == self.self_id || self.live.read().expect("live lock").contains_key(node)
    }

    /// Asks the node gossiping at `addr` to let this node in (harmless if already in).
    pub fn announce(&self, addr: SocketAddr) {
        let _ = self.tx.try_send(Input::Announce(addr));
    }

    /// Tells the cluster this node is leaving (clean shutdown).
    pub async fn leave(&self) {
        let _ = self.tx.send(Input::Leave).await;
        // Give the goodbye a moment to go out.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The foca payload of an announce from `from` to the node gossiping at `to`, before
/// sealing: what a joining member sends first. For tests that play a stranger.
pub fn announce_payload(from: GossipId, to: SocketAddr) -> Vec<u8> {
    let rng: StdRng = rand::make_rng();
    let config = Config::new_lan(NonZeroU32::new(8).expect("nonzero"));
    let mut foca = Foca::new(from, config, rng, PostcardCodec);
    let mut runtime = foca::AccumulatingRuntime::new();
    let target = GossipId {
        node: String::new(),
        addr: to,
        bump: 0,
    };
    foca.announce(target, &mut runtime)
        .expect("an announce to a valid address");
    runtime
        .to_send()
        .map(|(_, data)| data.to_vec())
        .expect("an announce sends one packet")
}

async fn run_receiver(
    socket: Arc<UdpSocket>,
    mut opener: Opener,
    max_packet: usize,
    tx: mpsc::Sender<Input>,
) {
    let mut buf = vec![0u8; max_packet + gossip_auth::OVERHEAD];
    let mut warned_clock = false;
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "gossip receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let data = match opener.open(&buf[..len], unix_ms()) {
            Ok(payload) => Bytes::copy_from_slice(payload),
            Err(Dropped::OutOfWindow) if !warned_clock => {
                // Authentic but too old or too new: a replay, or clocks that disagree.
                warn!(%from, window_ms = gossip_auth::WINDOW, "dropped a gossip packet stamped outside the window: are the nodes' clocks in sync?");
                warned_clock = true;
                continue;
            }
            Err(why) => {
                debug!(%from, ?why, "dropped a gossip packet");
                continue;
            }
        };
        if tx.send(Input::Data(data)).await.is_err() {
            return;
        }
    }
}

/// Delivers foca's timer events in deadline order (foca requires the order kept).
async fn run_timers(
    mut rx: mpsc::UnboundedReceiver<(Instant, Timer<GossipId>)>,
    tx: mpsc::Sender<Input>,
) {
    let mut queue: BTreeMap<(Instant, u64), Timer<GossipId>> = BTreeMap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while let Some(entry) = queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            if tx.send(Input::Timer(entry.remove())).await.is_err() {
                return;
            }
        }
        let next = queue.keys().next().map(|k| k.0);
        let received = match next {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => continue,
                r = rx.recv() => r,
            },
            None => rx.recv().await,
        };
        match received {
            Some((when, timer)) => {
                seq += 1;
                queue.insert((when, seq), timer);
            }
            None => return,
        }
    }
}

async fn run_foca(
    mut foca: Foca<GossipId, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    mut rx: mpsc::Receiver<Input>,
    socket: Arc<UdpSocket>,
    key: [u8; 32],
    timer_tx: mpsc::UnboundedSender<(Instant, Timer<GossipId>)>,
    live: Arc<RwLock<HashMap<String, SocketAddr>>>,
) {
    let mut runtime = foca::AccumulatingRuntime::new();
    let mut packet = Vec::with_capacity(2048);
    while let Some(input) = rx.recv().await {
        let result = match input {
            Input::Data(data) => foca.handle_data(&data, &mut runtime),
            Input::Timer(t) => foca.handle_timer(t, &mut runtime),
            Input::Announce(addr) => foca.announce(
                GossipId {
                    node: String::new(),
                    addr,
                    bump: 0,
                },
                &mut runtime,
            ),
            Input::Leave => foca.leave_cluster(&mut runtime),
        };
        if let Err(e) = result {
            debug!(error = %e, "gossip input ignored");
        }
        while let Some((dst, data)) = runtime.to_send() {
            gossip_auth::seal(&key, unix_ms(), rand::random(), &data, &mut packet);
            if let Err(e) = socket.send_to(&packet, dst.addr).await {
                debug!(to = %dst.addr, error = %e, "gossip send failed");
            }
        }
        let now = Instant::now();
        while let Some((delay, timer)) = runtime.to_schedule() {
            let _ = timer_tx.send((now + delay, timer));
        }
        let mut changed = false;
        while let Some(n) = runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    info!(node = %id.node, addr = %id.addr, "node up");
                    changed = true;
                }
                OwnedNotification::MemberDown(id) => {
                    info!(node = %id.node, addr = %id.addr, "node down");
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            let members: HashMap<String, SocketAddr> = foca
                .iter_members()
                .map(|m| (m.id().node.clone(), m.id().addr))
                .filter(|(node, _)| !node.is_empty())
                .collect();
            *live.write().expect("live lock") = members;
        }
    }
}
