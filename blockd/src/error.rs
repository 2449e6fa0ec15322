//! The node's error type and its mapping onto gRPC status codes.

use std::io;

/// Everything a node operation can fail with. Messages are written for the person
/// reading them at the CLI: they name the thing that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("refused: {0}")]
    PermissionDenied(String),
    #[error("cluster metadata store unavailable: {0}")]
    MetaUnavailable(String),
    #[error("node {node} unreachable: {reason}")]
    NodeUnreachable { node: String, reason: String },
    #[error("record {key} is corrupt: {reason}")]
    CorruptRecord { key: String, reason: String },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Internal(String),
    /// A replica's data or version file is not where it should be. Never answered with
    /// zeros: the replica leaves the in-sync set and is rebuilt by a full resync.
    #[error("replica missing: {0}")]
    ReplicaMissing(String),
    /// This node was replaced as the volume's coordinator (a newer epoch exists).
    #[error("fenced: {0}")]
    Fenced(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The errno a block device reader or writer should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace(_) => libc::ENOSPC,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) | Error::ReplicaMissing(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::Fenced(_) => Code::FailedPrecondition,
            Error::NoSpace(_) => Code::ResourceExhausted,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::MetaUnavailable(_) | Error::NodeUnreachable { .. } => Code::Unavailable,
            Error::CorruptRecord { .. } => Code::DataLoss,
            Error::Io(_) | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::ResourceExhausted => Error::NoSpace(msg),
            Code::PermissionDenied | Code::Unauthenticated => Error::PermissionDenied(msg),
            Code::Unavailable | Code::DeadlineExceeded => Error::NodeUnreachable {
                node: "peer".into(),
                reason: msg,
            },
            _ => Error::Internal(msg),
        }
    }
}
