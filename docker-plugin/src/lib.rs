//! The Docker volume plugin (HTTP over `/run/docker/plugins/shoal.sock`).
//!
//! Not built yet: see `docs/architecture.md`. No socket is served today.
