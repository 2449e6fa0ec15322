//! `mount.fuse.shoal` (and `mount.shoal`): what `mount -t fuse.shoal VOLUME DIR` and an
//! fstab line (`web /mnt/web fuse.shoal defaults,_netdev 0 0`) run when the `shoal`
//! binary is linked under that name in /sbin. It asks the local node to mount the shared
//! volume there, exactly as `shoal volume mount VOLUME DIR` does.
//!
//! Options: `endpoint=HOST:PORT` picks the node (default `SHOAL_ENDPOINT` or the node's
//! default address); `credentials=FILE` the admin credential (default
//! `SHOAL_CREDENTIALS`, then the CLI's default files); the usual generic options (`rw`, `defaults`, `_netdev`, `nofail`,
//! `noauto`, `user`, ...) are accepted and ignored. `remount` (with `ro` or `rw`) changes
//! the mount's read-only flag in the kernel, as `mount -o remount,ro DIR` expects.

use anyhow::{anyhow, bail};
use shoal_proto::control::MountRequest;

/// The names this binary answers to as a mount helper.
pub fn is_helper(argv0: &str) -> bool {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base == "mount.fuse.shoal" || base == "mount.shoal"
}

/// Parsed `mount.fuse.shoal SOURCE DIR [-o OPTS] [-n] [-v] [-f] [-s]`.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    volume: String,
    dir: String,
    endpoint: Option<String>,
    credentials: Option<String>,
    /// `-o remount`: Some(read-only wanted: Some(ro) when `ro`/`rw` was given, None to keep
    /// the current mode) instead of a new mount.
    remount: Option<Option<bool>>,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut pos = Vec::new();
    let mut endpoint = None;
    let mut credentials = None;
    let (mut remount, mut read_only) = (false, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => {
                let opts = it.next().ok_or_else(|| anyhow!("-o needs options"))?;
                for o in opts.split(',').filter(|o| !o.is_empty()) {
                    match o.split_once('=') {
                        Some(("endpoint", v)) => endpoint = Some(v.to_string()),
                        Some(("credentials", v)) => credentials = Some(v.to_string()),
                        _ if o == "remount" => remount = true,
                        _ if o == "ro" => read_only = Some(true),
                        _ if o == "rw" => read_only = Some(false),
                        // Generic options mount(8) and fstab pass along.
                        _ => {}
                    }
                }
            }
            "-n" | "-v" | "-f" | "-s" => {}
            "-t" => {
                it.next();
            }
            s if s.starts_with('-') => bail!("unknown option {s}"),
            s => pos.push(s.to_string()),
        }
    }
    let [volume, dir]: [String; 2] = pos
        .try_into()
        .map_err(|p: Vec<String>| anyhow!("expected VOLUME DIR, got {} argument(s)", p.len()))?;
    let volume = volume.trim_start_matches("shoal:").to_string();
    Ok(Args {
        volume,
        dir,
        endpoint,
        credentials,
        remount: remount.then_some(read_only),
    })
}

/// Runs the helper; the exit code follows mount(8): 0 ok, 1 usage, 32 mount failure.
pub fn main(args: &[String]) -> i32 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.fuse.shoal: {e}");
            eprintln!(
                "usage: mount -t fuse.shoal [-o endpoint=HOST:PORT,credentials=FILE] VOLUME DIR"
            );
            return 1;
        }
    };
    let endpoint = a
        .endpoint
        .or_else(|| std::env::var("SHOAL_ENDPOINT").ok())
        .unwrap_or_else(|| shoal_blockd::config::DEFAULT_LISTEN.to_string());
    let dir = match std::fs::canonicalize(&a.dir) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => {
            eprintln!("mount.fuse.shoal: mount point {}: {e}", a.dir);
            return 32;
        }
    };
    if let Some(wanted) = a.remount {
        // Neither ro nor rw given: keep what the mount is now.
        let read_only = wanted.unwrap_or_else(|| {
            nix::sys::statvfs::statvfs(dir.as_str())
                .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        });
        // The session stays; only the kernel's flag on the mount changes.
        use nix::mount::MsFlags;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // Read-only is refused (EBUSY) while the kernel still finishes closes and
        // removals of files just let go; those settle within moments.
        let mut tries = 0;
        return loop {
            match nix::mount::mount(
                None::<&str>,
                dir.as_str(),
                None::<&str>,
                flags,
                None::<&str>,
            ) {
                Ok(()) => break 0,
                Err(nix::errno::Errno::EBUSY) if tries < 40 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("mount.fuse.shoal: remount {dir}: {e}");
                    break 32;
                }
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mount.fuse.shoal: {e}");
            return 32;
        }
    };
    let res = rt.block_on(async {
        let creds = a
            .credentials
            .clone()
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("SHOAL_CREDENTIALS").map(std::path::PathBuf::from));
        let mut c = crate::connect(&endpoint, creds.as_deref()).await?;
        c.mount_volume(MountRequest {
            name: a.volume.clone(),
            path: dir.clone(),
        })
        .await
        .map_err(crate::status_error)?;
        Ok::<_, anyhow::Error>(())
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mount.fuse.shoal: {e:#}");
            32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_what_mount_passes() {
        assert_eq!(
            parse(&args(
                "web /mnt/web -o rw,_netdev,endpoint=10.0.0.2:9710,credentials=/etc/a.pem"
            ))
            .unwrap(),
            Args {
                volume: "web".into(),
                dir: "/mnt/web".into(),
                endpoint: Some("10.0.0.2:9710".into()),
                credentials: Some("/etc/a.pem".into()),
                remount: None,
            }
        );
        assert_eq!(parse(&args("shoal:web /m -n")).unwrap().volume, "web");
        assert!(parse(&args("web")).is_err());
        assert_eq!(
            parse(&args("shoal:web /m -o remount,ro")).unwrap().remount,
            Some(Some(true))
        );
        assert_eq!(
            parse(&args("shoal:web /m -o rw,remount")).unwrap().remount,
            Some(Some(false))
        );
        assert_eq!(
            parse(&args("shoal:web /m -o remount,noexec"))
                .unwrap()
                .remount,
            Some(None)
        );
        assert!(parse(&args("web /m -x")).is_err());
        assert!(is_helper("/sbin/mount.fuse.shoal") && !is_helper("shoal"));
    }
}
