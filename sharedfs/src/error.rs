//! The namespace's typed errors and the errno each one means to an application.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    /// An inode the caller named by number is gone (another host removed it after the
    /// caller looked it up): the kernel looks the path up again.
    #[error("stale file handle")]
    Stale,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("no space left on the volume")]
    NoSpace,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("file too large")]
    TooBig,
    #[error("no such attribute")]
    NoAttr,
    #[error("result does not fit the buffer")]
    Range,
    #[error("operation not permitted")]
    Perm,
    #[error("permission denied")]
    Access,
    #[error("too many links")]
    TooManyLinks,
    #[error("invalid cross-device link")]
    CrossDevice,
    #[error("resource temporarily unavailable")]
    WouldBlock,
    #[error("operation not supported")]
    NotSupported,
    /// A lock reclaimed after the grace period of a new coordinator: it may have been
    /// taken and released by someone else meanwhile, so it is not granted.
    #[error("lock lost: reclaimed after the grace period")]
    NoLock,
    /// The coordinator is stopping: the request is asked again at the next one.
    #[error("the coordinator is stopping")]
    NotServing,
    #[error("volume I/O failed: {0}")]
    Io(String),
    #[error("on-volume structure damaged: {0}")]
    Corrupt(String),
}

impl FsError {
    /// The errno an application sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Stale => libc::ESTALE,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::TooBig => libc::EFBIG,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Perm => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::CrossDevice => libc::EXDEV,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::NoLock => libc::ENOLCK,
            // Never shown to an application: the mount retries elsewhere (see service).
            FsError::NotServing => libc::ESHUTDOWN,
            FsError::Io(_) | FsError::Corrupt(_) => libc::EIO,
        }
    }
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;
