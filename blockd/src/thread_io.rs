//! Small replica calls on the calling thread: each thread that writes to a volume (a
//! FUSE thread of the device file, a namespace call on the coordinator) gets a runtime
//! and a connection per peer of its own, and drives its calls itself.
//!
//! Why: through the node's shared runtime, one small remote write is a chain of
//! hand-offs between threads (spawn, the channel's buffer task, the connection task,
//! the reply back to the waiting thread), each a wake-up of a sleeping thread. On this
//! project's 2-core machine a replicated 16-24 KiB write (a namespace transaction) took
//! about 370 µs through the shared runtime and 330 µs from the calling thread (the
//! replica's own work is under 50 µs; the rest is the loopback gRPC round trip). Large
//! writes keep the shared runtime: there the remote copy travels while this thread
//! writes the local one.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::peers::{PeerBlockClient, Peers};

/// A thread's own runtime and its connections, by peer address.
struct ThreadIo {
    rt: Option<tokio::runtime::Runtime>,
    clients: HashMap<String, PeerBlockClient>,
}

thread_local! {
    static THREAD_IO: RefCell<Option<ThreadIo>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's runtime and a client per address in `addresses` (in that
/// order); None when a connection cannot be made (the caller takes the shared path).
///
/// Call it only where `Handle::block_on` would be allowed too (a plain thread, the
/// blocking pool, `block_in_place`): `f` blocks on the thread's runtime.
pub fn with_clients<T>(
    peers: &Peers,
    addresses: &[&str],
    f: impl FnOnce(&tokio::runtime::Runtime, Vec<PeerBlockClient>) -> T,
) -> Option<T> {
    THREAD_IO.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            *slot = Some(ThreadIo {
                rt: Some(rt),
                clients: HashMap::new(),
            });
        }
        let io = slot.as_mut().expect("set above");
        let rt = io.rt.as_ref().expect("only taken at drop");
        let mut clients = Vec::with_capacity(addresses.len());
        for a in addresses {
            if !io.clients.contains_key(*a) {
                // The connection's tasks belong to this thread's runtime.
                let _in = rt.enter();
                io.clients
                    .insert(a.to_string(), peers.block_private(a).ok()?);
            }
            clients.push(io.clients[*a].clone());
        }
        Some(f(rt, clients))
    })
}

/// Forgets this thread's connection to `address` (it failed): the next call makes a
/// new one.
pub fn forget(address: &str) {
    THREAD_IO.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if let Some(io) = slot.as_mut() {
                io.clients.remove(address);
            }
        }
    });
}

impl Drop for ThreadIo {
    fn drop(&mut self) {
        self.clients.clear();
        // The thread is ending, maybe inside another runtime's shutdown: do not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
