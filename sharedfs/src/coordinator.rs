//! What runs on a shared volume's coordinator. The rules live in pure tables with the
//! time passed in ([`leases`]: who may cache what; [`locks`]: the one lock table and its
//! waiters), [`replies`] keeps the answers to changes in the volume so a retry across a
//! failover is not run twice, [`sessions`] keeps who is mounted and what each holds
//! open, which unlinked files live on, and the grace windows, and [`service`] is the
//! namespace service that applies
//! them for every mount (its tonic shell in `service/grpc.rs`).

pub mod leases;
pub mod locks;
pub mod replies;
pub mod service;
pub mod sessions;
