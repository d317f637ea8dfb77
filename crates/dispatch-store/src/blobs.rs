//! Content-addressed blobs on disk: `DIR/sha256/<hex>`. Written to a temporary file in the
//! same directory, then renamed, so a reader never sees half a blob.

use std::io::Write;
use std::path::{Path, PathBuf};

use dispatch_core::digest;

use crate::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into().join("sha256");
        std::fs::create_dir_all(&dir).map_err(|source| io("create", &dir, source))?;
        Ok(BlobStore { dir })
    }

    /// Stores `bytes` and returns their digest; storing the same bytes twice is a no-op.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let d = digest::sha256(bytes);
        let path = self.path(&d);
        if path.exists() {
            return Ok(d);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|source| io("create a temporary file in", &self.dir, source))?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|source| io("write", tmp.path(), source))?;
        tmp.persist(&path)
            .map_err(|e| io("rename a blob to", &path, e.error))?;
        Ok(d)
    }

    /// Where the blob of `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest::hex_part(digest))
    }

    pub fn exists(&self, digest: &str) -> bool {
        digest::is_sha256(digest) && self.path(digest).is_file()
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest);
        std::fs::read(&p).map_err(|source| io("read", &p, source))
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let d1 = blobs.put(b"hello").unwrap();
        let d2 = blobs.put(b"hello").unwrap();
        assert_eq!(d1, d2);
        assert_eq!(d1, digest::sha256(b"hello"));
        assert_eq!(blobs.read(&d1).unwrap(), b"hello");
        assert!(blobs.exists(&d1));
        assert!(!blobs.exists(&digest::sha256(b"other")));
        assert!(!blobs.exists("../../etc/passwd"));
    }
}
