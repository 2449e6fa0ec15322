//! What the node calls to serve and mount shared namespaces (see
//! `shoal_blockd::shared`): formats or opens the namespace in a volume this node
//! coordinates, and mounts FUSE clients that talk to a coordinator anywhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use shoal_blockd::peers::Peers;
use shoal_blockd::records::VolumeRecord;
use shoal_blockd::role_lease::RoleGate;
use shoal_blockd::shared::{Resolver, SharedNamespaces};
use shoal_blockd::volume_io::VolumeIo;
use shoal_blockd::{Error, Result};
use tracing::info;

use crate::coordinator::service::NamespaceService;
use crate::dev::BlockDev;
use crate::error::FsError;
use crate::fs::Fs;
use crate::mount::{Connect, InProcess, Mount};
use crate::volume_dev::VolumeDev;

pub struct Shared {
    pub service: NamespaceService,
    peers: Arc<Peers>,
    node_id: String,
    /// The address this node serves and advertises.
    address: String,
    rt: tokio::runtime::Handle,
    mounts: Mutex<HashMap<PathBuf, Mount>>,
}

impl Shared {
    pub fn new(
        service: NamespaceService,
        peers: Arc<Peers>,
        node_id: &str,
        address: &str,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            service,
            peers,
            node_id: node_id.to_string(),
            address: address.to_string(),
            rt,
            mounts: Mutex::new(HashMap::new()),
        }
    }
}

fn fs_err(e: FsError) -> Error {
    match e {
        FsError::Invalid(m) => Error::InvalidArgument(m),
        FsError::NoSpace => Error::Internal("no space left on the volume".into()),
        other => Error::Internal(format!("shared namespace: {other}")),
    }
}

/// Whether `path` is a mount point now (from /proc/self/mountinfo).
fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

/// The namespace's uuid: the volume id's first 16 bytes of hex.
fn uuid_of(rec: &VolumeRecord) -> [u8; 16] {
    let mut u = [0u8; 16];
    for (i, b) in rec.id.bytes().take(16).enumerate() {
        u[i] = b;
    }
    u
}

impl SharedNamespaces for Shared {
    fn serve(&self, rec: &VolumeRecord, io: Arc<VolumeIo>, gate: RoleGate) -> Result<()> {
        let dev: Arc<dyn BlockDev> = Arc::new(VolumeDev(io));
        let fs = match Fs::open_keeping_orphans(dev.clone()) {
            Ok(fs) => fs,
            Err(FsError::Corrupt(why)) if !rec.formatted => {
                info!(volume = %rec.name, reason = %why, "formatting the shared namespace on first attach");
                Fs::format(dev.clone(), uuid_of(rec)).map_err(fs_err)?;
                Fs::open(dev).map_err(fs_err)?
            }
            Err(e) => return Err(fs_err(e)),
        };
        self.service.add(&rec.id, fs, &self.rt, gate);
        Ok(())
    }

    fn stop(&self, volume_id: &str) {
        self.service.remove(volume_id);
    }

    fn mount(
        &self,
        rec: &VolumeRecord,
        coordinator: &str,
        path: &Path,
        resolve: Resolver,
    ) -> Result<()> {
        let mut mounts = self.mounts.lock().expect("mounts");
        // Unmounted behind our back (`umount DIR`): forget it.
        if mounts.contains_key(path) && !is_mountpoint(path) {
            if let Some(mut stale) = mounts.remove(path) {
                let _ = stale.stop();
            }
        }
        if mounts.contains_key(path) {
            return Err(Error::FailedPrecondition(format!(
                "{} is already a Shoal mount",
                path.display()
            )));
        }
        let client = {
            let _g = self.rt.enter();
            self.peers.namespace(coordinator)?
        };
        let (peers, rt) = (self.peers.clone(), self.rt.clone());
        let connect: Connect = Arc::new(move |addr: &str| {
            let _g = rt.enter();
            peers.namespace(addr).ok()
        });
        let peers = self.peers.clone();
        let private: Connect = Arc::new(move |addr: &str| peers.namespace_private(addr).ok());
        let m = Mount::start(
            &rec.id,
            &rec.name,
            &self.node_id,
            path,
            coordinator,
            client,
            resolve,
            connect,
            private,
            Some(InProcess {
                address: self.address.clone(),
                service: self.service.clone(),
            }),
            self.rt.clone(),
        )
        .map_err(|e| Error::Internal(format!("mounting at {}: {e}", path.display())))?;
        mounts.insert(path.to_path_buf(), m);
        Ok(())
    }

    fn unmount(&self, path: &Path) -> Result<bool> {
        let mut mounts = self.mounts.lock().expect("mounts");
        let Some(mut m) = mounts.remove(path) else {
            return Ok(false);
        };
        match m.stop() {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Still in use: it stays mounted and served.
                mounts.insert(path.to_path_buf(), m);
                Err(Error::FailedPrecondition(format!(
                    "{} is busy (files open or a process inside): not unmounted",
                    path.display()
                )))
            }
            Err(e) => Err(Error::Internal(format!(
                "unmounting {}: {e}",
                path.display()
            ))),
        }
    }

    fn mounts(&self) -> Vec<(String, PathBuf)> {
        self.mounts
            .lock()
            .expect("mounts")
            .values()
            .map(|m| (m.volume_id.clone(), m.path.clone()))
            .collect()
    }
}
