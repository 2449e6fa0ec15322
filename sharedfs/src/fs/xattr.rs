//! Extended attributes of the namespace's inodes.

use super::*;

impl Fs {
    // ---- xattrs ------------------------------------------------------------------

    pub fn getxattr(&mut self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.getattr(ino)?;
        self.bt_get(&xattr_key(ino, name))?.ok_or(FsError::NoAttr)
    }

    /// `create`: fail if it exists; `replace`: fail if it does not.
    pub fn setxattr(
        &mut self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> Result<()> {
        self.run(|fs| {
            let mut i = fs.getattr(ino)?;
            if name.is_empty() {
                return Err(FsError::Invalid("empty attribute name".into()));
            }
            if name.len() > NAME_MAX {
                return Err(FsError::Range);
            }
            if value.len() > MAX_VALUE {
                return Err(FsError::NoSpace);
            }
            let exists = fs.bt_get(&xattr_key(ino, name))?.is_some();
            if create && exists {
                return Err(FsError::Exists);
            }
            if replace && !exists {
                return Err(FsError::NoAttr);
            }
            fs.bt_put(&xattr_key(ino, name), value)?;
            i.ctime = Time::now();
            fs.put_inode(&i)
        })
    }

    pub fn listxattr(&mut self, ino: u64) -> Result<Vec<Vec<u8>>> {
        self.getattr(ino)?;
        Ok(self
            .bt_range(
                &xattr_key(ino, &[]),
                Bound::Excluded(&after(b'X', ino)),
                usize::MAX,
            )?
            .into_iter()
            .map(|(k, _)| k[9..].to_vec())
            .collect())
    }

    pub fn removexattr(&mut self, ino: u64, name: &[u8]) -> Result<()> {
        self.run(|fs| {
            let mut i = fs.getattr(ino)?;
            if !fs.bt_del(&xattr_key(ino, name))? {
                return Err(FsError::NoAttr);
            }
            i.ctime = Time::now();
            fs.put_inode(&i)
        })
    }
}
