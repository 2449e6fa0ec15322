//! Mounting and unmounting a client in the kernel: the `/dev/fuse` session of one mount.

use super::*;

/// Whether `path` is still the mount made with device number `dev`.
fn is_our_mount(path: &Path, dev: u64) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    let (Ok(here), Ok(above)) = (std::fs::metadata(path), std::fs::metadata(parent)) else {
        // A dead FUSE connection makes stat fail: still a mount point, and ours.
        return true;
    };
    here.dev() == dev && here.dev() != above.dev()
}

/// Mounts a FUSE filesystem of type `fuse.shoal` at `path` and returns the `/dev/fuse`
/// descriptor that serves it. Mounted here rather than by fuser, which always mounts as
/// plain `fuse`: with the subtype, `/proc/mounts` and `df -T` say what it is, and
/// `mount -o remount,ro` goes to `mount.fuse.shoal` (or, without that helper, straight
/// to the kernel) instead of `mount.fuse`, which cannot remount it.
fn mount_fuse(volume_name: &str, path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let fd = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        fd.as_raw_fd()
    );
    nix::mount::mount(
        Some(format!("shoal:{volume_name}").as_str()),
        path,
        Some("fuse.shoal"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )?;
    Ok(fd)
}

/// A mounted client.
pub struct Mount {
    pub volume_id: String,
    pub path: PathBuf,
    rpc: Arc<Rpc>,
    session: Option<fuser::BackgroundSession>,
    /// Device number of the mount (to tell it from whatever else is mounted there later).
    dev: u64,
}

impl Mount {
    /// Mounts `volume_id` at `path`, served by the coordinator behind `client`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        volume_id: &str,
        volume_name: &str,
        host: &str,
        path: &Path,
        addr: &str,
        client: PeerNamespaceClient,
        resolve: Resolver,
        connect: Connect,
        private: Connect,
        in_process: Option<InProcess>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let rpc = Rpc::connect(
            volume_id, host, path, addr, client, resolve, connect, private, in_process, rt,
        )
        .map_err(|s| std::io::Error::other(format!("opening a session: {}", s.message())))?;
        // Often enough to renew the leases (2 s at the mount) before they run out.
        rpc.clone().heartbeat_loop(Duration::from_millis(700));
        let mut config = fuser::Config::default();
        // Containers run as any user: everyone may use the mount, the modes decide.
        config.acl = fuser::SessionACL::All;
        // Threads blocked in F_SETLKW must not starve the unlock that frees them.
        config.n_threads = Some(16);
        config.clone_fd = true;
        let fd = match mount_fuse(volume_name, path) {
            Ok(fd) => fd,
            Err(e) => {
                rpc.close();
                return Err(e);
            }
        };
        let session =
            match fuser::Session::from_fd(Client::new(rpc.clone()), fd, config.acl, config)
                .and_then(|s| s.spawn())
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
                    rpc.close();
                    return Err(e);
                }
            };
        // Only now: a stat of the new mount waits for the session to answer.
        let dev = std::fs::metadata(path).map(|m| m.dev()).unwrap_or(0);
        rpc.clone().callback_loop(session.notifier());
        info!(volume = volume_id, path = %path.display(), "shared namespace mounted");
        Ok(Self {
            volume_id: volume_id.to_string(),
            path: path.to_path_buf(),
            rpc,
            session: Some(session),
            dev,
        })
    }

    /// Unmounts and closes the session. A mount in use (open files, a process inside)
    /// is left as it is and EBUSY returned, as umount(8) does; the mount stays served.
    pub fn stop(&mut self) -> std::io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        // Only our own mount: if someone unmounted it and mounted something else at this
        // path meanwhile, that is not ours to take away.
        let ours = is_our_mount(&self.path, self.dev);
        if ours {
            if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::empty()) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    self.session = Some(s);
                    return Err(std::io::Error::from(e));
                }
            }
        }
        // The session thread ends when the kernel lets go of the connection, which a
        // bind copy of the mount elsewhere (a container's) can delay: wait a moment,
        // then leave the thread to finish on its own rather than block the caller.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !s.guard.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if s.guard.is_finished() {
            let _ = s.join();
        } else {
            warn!(path = %self.path.display(), "the FUSE connection outlives the unmount (a bind copy in use?)");
        }
        self.rpc.close();
        Ok(())
    }
}
