//! Content-addressed blobs on disk: `DIR/sha256/<hex>`. Written to a temporary file in the
//! same directory, then renamed, so a reader never sees half a blob. Read back only after
//! their bytes are checked against their name: a blob altered on disk (a bad sector, a
//! hand edit) is an error that says so, never someone's code run as another's; storing the
//! same bytes again repairs it.

use std::io::Write;
use std::path::{Path, PathBuf};

use dispatch_core::digest;

use crate::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: String,
    pub bytes: u64,
    pub modified: std::time::SystemTime,
}

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
        if path.exists() && std::fs::read(&path).is_ok_and(|b| digest::sha256(&b) == d) {
            // Refresh its age: garbage collection spares blobs touched within its grace
            // period, so a re-upload is safe until the function that names it is created.
            let touched = std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            touched.map_err(|source| io("touch", &path, source))?;
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

    /// Every blob: digest, size, last modified.
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|source| io("list", &self.dir, source))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue; // temporary files of writes in progress
            }
            let Ok(meta) = e.metadata() else { continue };
            out.push(BlobInfo {
                digest: format!("sha256:{name}"),
                bytes: meta.len(),
                modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    /// Removes a blob (missing is fine).
    pub fn remove(&self, digest: &str) -> Result<()> {
        let p = self.path(digest);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io("remove", &p, source)),
        }
    }

    /// The bytes of `digest`, checked against it ([`StoreError::CorruptBlob`] if they differ).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest);
        let bytes = std::fs::read(&p).map_err(|source| io("read", &p, source))?;
        if digest::sha256(&bytes) != digest {
            return Err(StoreError::CorruptBlob {
                digest: digest.to_string(),
            });
        }
        Ok(bytes)
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
        // Altered on disk: reading says so; storing the same bytes again repairs it.
        std::fs::write(blobs.path(&d1), b"hellO").unwrap();
        let e = blobs.read(&d1).unwrap_err();
        assert!(matches!(e, StoreError::CorruptBlob { .. }), "{e}");
        assert!(e.to_string().contains("upload"), "{e}");
        assert_eq!(blobs.put(b"hello").unwrap(), d1);
        assert_eq!(blobs.read(&d1).unwrap(), b"hello");
        assert!(!blobs.exists("../../etc/passwd"));
        let listed = blobs.list().unwrap();
        assert_eq!(
            (listed.len(), listed[0].digest.as_str(), listed[0].bytes),
            (1, d1.as_str(), 5)
        );
        blobs.remove(&d1).unwrap();
        blobs.remove(&d1).unwrap();
        assert!(!blobs.exists(&d1));
    }
}
