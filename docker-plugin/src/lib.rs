//! The Docker volume plugin: every `shoal node` answers Docker's volume plugin protocol
//! (JSON over HTTP on a unix socket, `/run/docker/plugins/shoal.sock` by default), so
//! `docker volume create -d shoal` and `docker run -v web:/data` use Shoal volumes.
//!
//! - [`options`]: Docker's `--opt` map and the inline `size=5G,name=web` form → a
//!   volume spec;
//! - [`mounts`]: which containers hold which volume mounted on this host;
//! - [`plugin`]: the endpoints, over a [`backend::Backend`] (the node);
//! - [`server`]: the unix-socket HTTP server Docker talks to.

pub mod backend;
pub mod error;
pub mod mounts;
pub mod options;
pub mod plugin;
pub mod server;
mod time;

pub use error::PluginError;
pub use plugin::Plugin;
pub use server::serve;
