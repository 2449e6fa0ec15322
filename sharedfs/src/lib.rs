//! The shared namespace: one POSIX filesystem stored in a volume and mounted on many hosts.
//!
//! Not built yet. The design is in `docs/architecture.md` ("Shared namespace"); until it
//! lands, `shoal volume create --shared` is refused with a clear error by the node.
