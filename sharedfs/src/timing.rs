//! Where a namespace operation's time goes, logged when the `shoal::timing` target is on
//! (`RUST_LOG=info,shoal::timing=debug`; off, it costs one check per operation). The
//! coordinator logs one line per operation: its whole time in the service, and the
//! replicated volume writes and flushes it waited for (counted on the thread that ran
//! it); the mount logs one line per call: the round trip to the coordinator.
//! `tests/bench-timing.sh` reads these lines and prints medians.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The tracing target of the timing lines.
pub const TARGET: &str = "shoal::timing";

/// Whether timing lines are wanted (the filter is read once per operation).
pub fn on() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

thread_local! {
    static DEV: Cell<Dev> = const { Cell::new(Dev::ZERO) };
}

/// Volume I/O waited for on this thread since the last [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dev {
    pub writes: u32,
    pub write: Duration,
    pub flushes: u32,
    pub flush: Duration,
}

impl Dev {
    const ZERO: Dev = Dev {
        writes: 0,
        write: Duration::ZERO,
        flushes: 0,
        flush: Duration::ZERO,
    };
}

/// Counts a replicated write that started at `start`.
pub fn wrote(start: Instant) {
    DEV.with(|d| {
        let mut v = d.get();
        v.writes += 1;
        v.write += start.elapsed();
        d.set(v);
    });
}

/// Counts a replicated flush that started at `start`.
pub fn flushed(start: Instant) {
    DEV.with(|d| {
        let mut v = d.get();
        v.flushes += 1;
        v.flush += start.elapsed();
        d.set(v);
    });
}

/// This thread's volume I/O since the last call, and starts counting again.
pub fn take() -> Dev {
    DEV.with(|d| d.replace(Dev::ZERO))
}

/// The name of a namespace operation, for the timing lines.
pub fn op_name(op: Option<&shoal_proto::ns::ns_request::Op>) -> &'static str {
    use shoal_proto::ns::ns_request::Op;
    match op {
        None => "none",
        Some(op) => match op {
            Op::Lookup(_) => "lookup",
            Op::Getattr(_) => "getattr",
            Op::Setattr(_) => "setattr",
            Op::Create(_) => "create",
            Op::Unlink(_) => "unlink",
            Op::Rmdir(_) => "rmdir",
            Op::Rename(_) => "rename",
            Op::Read(_) => "read",
            Op::Write(_) => "write",
            Op::Fsync(_) => "fsync",
            Op::Open(_) => "open",
            Op::Release(_) => "release",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_is_counted_per_thread_until_taken() {
        let t = Instant::now();
        wrote(t);
        wrote(t);
        flushed(t);
        let other = std::thread::spawn(take).join().unwrap();
        assert_eq!(other, Dev::ZERO, "another thread saw nothing");
        let d = take();
        assert_eq!((d.writes, d.flushes), (2, 1));
        assert_eq!(take(), Dev::ZERO, "taken once");
    }
}
