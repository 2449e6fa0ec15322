//! A replicated Shoal volume as the namespace's block device: every write goes to all
//! in-sync replicas before it returns, and a flush makes it durable on all of them.

use std::sync::Arc;
use std::time::Instant;

use shoal_blockd::volume_io::VolumeIo;

use crate::dev::BlockDev;
use crate::error::{FsError, Result};
use crate::timing;

pub struct VolumeDev(pub Arc<VolumeIo>);

fn io_err(e: shoal_blockd::Error) -> FsError {
    if e.errno() == libc::ENOSPC {
        FsError::NoSpace
    } else {
        FsError::Io(e.to_string())
    }
}

/// Largest single request to the volume layer.
const MAX_IO: usize = 4 << 20;

impl BlockDev for VolumeDev {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len <= MAX_IO {
            return self.0.read(offset, len as u32).map_err(io_err);
        }
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(MAX_IO);
            out.extend(
                self.0
                    .read(offset + out.len() as u64, n as u32)
                    .map_err(io_err)?,
            );
        }
        Ok(out)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = timing::on().then(Instant::now);
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            self.0
                .write(offset + (i * MAX_IO) as u64, chunk, false)
                .map_err(io_err)?;
        }
        if let Some(t) = start {
            timing::wrote(t);
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        let start = timing::on().then(Instant::now);
        self.0.flush().map_err(io_err)?;
        if let Some(t) = start {
            timing::flushed(t);
        }
        Ok(())
    }
}
