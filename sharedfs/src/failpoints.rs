//! Failpoints: crashes on demand at the moments that are hard to hit from outside, so
//! the integration tests can prove what happens there with real processes.
//!
//! Off unless the node is started with `SHOAL_FAILPOINTS` set; read once. Supported:
//! - `crash-after-commit=NAME`: the coordinator aborts right after a change on a file
//!   named NAME committed, before its reply goes out (the mount must retry it at the
//!   next coordinator, which must not run it again).

use std::sync::OnceLock;

use shoal_proto::ns::ns_request::Op;

fn crash_after_commit_name() -> Option<&'static [u8]> {
    static NAME: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    NAME.get_or_init(|| {
        let spec = std::env::var("SHOAL_FAILPOINTS").ok()?;
        spec.split(',')
            .find_map(|p| p.strip_prefix("crash-after-commit="))
            .map(|n| n.as_bytes().to_vec())
    })
    .as_deref()
}

/// Called after `op` succeeded and committed, before its reply is sent.
pub fn after_commit(op: &Op) {
    let Some(want) = crash_after_commit_name() else {
        return;
    };
    let name: &[u8] = match op {
        Op::Create(c) => &c.name,
        Op::Link(l) => &l.name,
        Op::Unlink(e) | Op::Rmdir(e) => &e.name,
        Op::Rename(r) => &r.name,
        _ => return,
    };
    if name == want {
        tracing::error!(
            name = %String::from_utf8_lossy(name),
            "failpoint crash-after-commit: aborting before the reply"
        );
        std::process::abort();
    }
}
