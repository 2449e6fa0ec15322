//! The block device the namespace lives on: a replicated Shoal volume in a node, a
//! plain file in unit tests. Offsets and lengths are bytes; the namespace only issues
//! 4 KiB-aligned I/O.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{FsError, Result};

/// What the namespace needs from a volume.
pub trait BlockDev: Send + Sync {
    /// Volume size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes every completed write durable (on every in-sync replica, for a volume).
    fn flush(&self) -> Result<()>;
}

/// A sparse file used as a device (tests, tools).
pub struct FileDev {
    file: File,
    size: u64,
}

impl FileDev {
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        file.set_len(size).map_err(io)?;
        Ok(Self { file, size })
    }
}

fn io(e: std::io::Error) -> FsError {
    FsError::Io(e.to_string())
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(io)?;
        Ok(buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if offset + data.len() as u64 > self.size {
            return Err(FsError::Io(format!(
                "write past the device end at {offset}"
            )));
        }
        self.file.write_all_at(data, offset).map_err(io)
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(io)
    }
}
