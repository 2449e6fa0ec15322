//! Taking attachments down: a teardown (the device file, its loop device and mount, the
//! volume I/O), detach and unmount, and at start-up or shutdown every local attachment
//! and the stale ones a previous process left behind.

use super::*;

impl Node {
    /// Unmounts and releases everything of one attachment, best effort, in order.
    pub(crate) async fn teardown(&self, mut att: Attachment) {
        att.stop.store(true, Ordering::Relaxed);
        if att.shared {
            if let Ok(hooks) = self.shared_hooks() {
                let id = att.volume_id.clone();
                let _ = tokio::task::spawn_blocking(move || hooks.stop(&id)).await;
            }
        }
        // Releases the role (its lease), after the namespace stopped.
        drop(att.role.take());
        if let Some(p) = att.mount_path.take() {
            if let Err(e) = host::umount(&p, false).await {
                warn!(path = %p.display(), error = %e, "busy; detaching the mount lazily");
                let _ = host::umount(&p, true).await;
            }
        }
        if let Some(dev) = att.loop_dev.take() {
            for p in host::mounts_of_device(&dev) {
                let _ = host::umount(&p, true).await;
            }
            if let Err(e) = host::loop_detach(&dev).await {
                warn!(device = %dev, error = %e, "loop device release failed");
            }
        }
        if let Some(session) = att.session.take() {
            let dir = att.fuse_dir.clone();
            let joined = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                let _ = host::umount(&dir, true).await;
            }
        }
        info!(volume = %att.name, "detached");
    }

    /// Detaches a volume wherever it is attached.
    #[instrument(skip(self))]
    pub async fn detach(&self, name: &str) -> Result<()> {
        let (rec, _) = self.volume_by_name(name).await?;
        let Some(node) = rec.attached_node.clone() else {
            return Err(Error::FailedPrecondition(format!(
                "volume {name:?} is not attached"
            )));
        };
        if node != self.id {
            if self.membership.is_online(&node) {
                let target = self.node_record(&node).await?;
                let mut c = self.peers.control(&target.address)?;
                c.detach_volume(VolumeRef {
                    name: name.to_string(),
                })
                .await?;
                return Ok(());
            }
            warn!(dead = %node, "clearing the attachment of an offline node");
        } else if let Some(att) = self.attachments.lock().await.remove(&rec.id) {
            self.teardown(att).await;
        }
        self.update_volume(&rec.id, |r| {
            r.clear_attachment();
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Unmounts the volume filesystem mounted at `path` on this node (it stays attached).
    pub async fn unmount(&self, path: &str) -> Result<()> {
        let p = PathBuf::from(path);
        if let Ok(hooks) = self.shared_hooks() {
            let q = p.clone();
            let was_shared = tokio::task::spawn_blocking(move || hooks.unmount(&q))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            if was_shared {
                return Ok(());
            }
        }
        let mut atts = self.attachments.lock().await;
        let Some((id, att)) = atts
            .iter_mut()
            .find(|(_, a)| a.mount_path.as_deref() == Some(p.as_path()))
        else {
            return Err(Error::FailedPrecondition(format!(
                "no Shoal volume is mounted at {path} on node {}",
                self.id
            )));
        };
        host::umount(&p, false).await?;
        att.mount_path = None;
        let id = id.clone();
        drop(atts);
        self.update_volume(&id, |r| {
            r.mount_path.clear();
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// On shutdown: releases every local attachment and clears its record.
    pub async fn detach_all_local(&self) {
        // Client mounts first: they may be served by a volume attached here.
        if let Ok(hooks) = self.shared_hooks() {
            for (_, path) in hooks.mounts() {
                let h = hooks.clone();
                let _ = tokio::task::spawn_blocking(move || h.unmount(&path)).await;
            }
        }
        let drained: Vec<(String, Attachment)> = self.attachments.lock().await.drain().collect();
        for (id, att) in drained {
            self.teardown(att).await;
            let me = self.id.clone();
            let _ = self
                .update_volume(&id, |r| {
                    // A newer coordinator may have taken the volume over: leave it be.
                    if r.attached_node.as_deref() != Some(me.as_str()) {
                        return Err(Error::FailedPrecondition("attached elsewhere now".into()));
                    }
                    r.clear_attachment();
                    Ok(())
                })
                .await;
        }
    }

    /// On start: a previous run of this node that died left mounts that no process
    /// serves any more. Release them, and the attach records that name this node.
    pub async fn clean_stale_attachments(&self) {
        let root = self.attach_root();
        for dev in host::loops_backed_under(&root) {
            for p in host::mounts_of_device(&dev) {
                warn!(path = %p.display(), "releasing a mount left by a previous run");
                let _ = host::umount(&p, true).await;
            }
            let _ = host::loop_detach(&dev).await;
        }
        for p in host::mounts_under(&root) {
            let _ = host::umount(&p, true).await;
        }
        let Ok(recs) = self.volume_records().await else {
            return;
        };
        for rec in recs {
            if rec.attached_node.as_deref() == Some(self.id.as_str()) {
                let _ = self
                    .update_volume(&rec.id, |r| {
                        r.clear_attachment();
                        Ok(())
                    })
                    .await;
            }
        }
    }
}
