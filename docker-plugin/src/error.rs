//! What can go wrong answering Docker; every error becomes `{"Err": "<message>"}`, which
//! Docker shows the user after `Error response from daemon: ...`.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PluginError {
    /// The request itself is malformed (not JSON, a missing field): HTTP 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An option or value the user gave is not accepted.
    #[error("{0}")]
    InvalidOption(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    /// The volume is mounted by containers or other hosts.
    #[error("{0}")]
    InUse(String),
    /// The node refused or failed (its message is passed on as is).
    #[error("{0}")]
    Backend(String),
}

impl From<shoal_blockd::Error> for PluginError {
    fn from(e: shoal_blockd::Error) -> Self {
        match e {
            shoal_blockd::Error::NotFound(what) => {
                PluginError::Backend(format!("{what} not found"))
            }
            shoal_blockd::Error::InvalidArgument(m) => PluginError::InvalidOption(m),
            other => PluginError::Backend(other.to_string()),
        }
    }
}
