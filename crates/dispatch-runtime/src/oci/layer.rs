//! Reproducible layers built in memory: sorted entries, mtime 0, root-owned, gzip'd tar —
//! the same files give the same digest.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;

use super::*;

/// One image layer: gzip'd tar bytes, their digest, and the digest of the uncompressed tar
/// (the config's `rootfs.diff_ids`).
#[derive(Debug, Clone)]
pub struct Layer {
    pub data: Bytes,
    pub digest: String,
    pub diff_id: String,
    /// What made it (the config's history entry).
    pub created_by: String,
}

enum Entry {
    Dir,
    File { mode: u32, data: Bytes },
    Symlink(String),
}

/// Builds a reproducible layer: entries are written sorted by path, with mtime 0, uid/gid 0;
/// parent directories are added. Paths are absolute inside the image.
#[derive(Default)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder::default()
    }

    fn key(path: &str) -> Result<String, OciError> {
        let p = path.trim_start_matches('/').trim_end_matches('/');
        if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(OciError::Layer(format!(
                "{path:?} is not a clean path inside the image"
            )));
        }
        Ok(p.to_string())
    }

    fn parents(&mut self, key: &str) {
        let mut at = 0;
        while let Some(i) = key[at..].find('/') {
            let dir = &key[..at + i];
            self.entries.entry(dir.to_string()).or_insert(Entry::Dir);
            at += i + 1;
        }
    }

    pub fn dir(&mut self, path: &str) -> Result<&mut Self, OciError> {
        let k = Self::key(path)?;
        self.parents(&k);
        self.entries.entry(k).or_insert(Entry::Dir);
        Ok(self)
    }

    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        data: impl Into<Bytes>,
    ) -> Result<&mut Self, OciError> {
        let k = Self::key(path)?;
        self.parents(&k);
        self.entries.insert(
            k,
            Entry::File {
                mode: mode & 0o7777,
                data: data.into(),
            },
        );
        Ok(self)
    }

    /// Adds the files, directories and symlinks under `host` as `prefix/...`.
    pub fn tree(&mut self, prefix: &str, host: &Path) -> Result<&mut Self, OciError> {
        use std::os::unix::fs::PermissionsExt as _;
        let io = |p: &Path, e: std::io::Error| OciError::Layer(format!("{}: {e}", p.display()));
        self.dir(prefix)?;
        let mut stack = vec![host.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let entry = entry.map_err(|e| io(&dir, e))?;
                let path = entry.path();
                let rel = path
                    .strip_prefix(host)
                    .map_err(|e| OciError::Layer(e.to_string()))?
                    .to_str()
                    .ok_or_else(|| OciError::Layer(format!("{}: not UTF-8", path.display())))?
                    .to_string();
                let inside = format!("{}/{rel}", prefix.trim_end_matches('/'));
                let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).map_err(|e| io(&path, e))?;
                    let k = Self::key(&inside)?;
                    self.parents(&k);
                    self.entries
                        .insert(k, Entry::Symlink(target.to_string_lossy().into_owned()));
                } else if meta.is_dir() {
                    self.dir(&inside)?;
                    stack.push(path);
                } else if meta.is_file() {
                    let data = std::fs::read(&path).map_err(|e| io(&path, e))?;
                    self.file(&inside, meta.permissions().mode(), data)?;
                }
            }
        }
        Ok(self)
    }

    /// The tar.gz, its digest and diff id.
    pub fn finish(&self, created_by: &str) -> Result<Layer, OciError> {
        let err = |e: std::io::Error| OciError::Layer(e.to_string());
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match entry {
                Entry::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(err)?;
                }
                Entry::File { mode, data } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, &data[..]).map_err(err)?;
                }
                Entry::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target).map_err(err)?;
                }
            }
        }
        let raw = tar.into_inner().map_err(err)?;
        // gzip's header carries no name and mtime 0: the same tar gives the same bytes.
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).map_err(err)?;
        let data = gz.finish().map_err(err)?;
        Ok(Layer {
            digest: sha256(&data),
            diff_id: sha256(&raw),
            data: data.into(),
            created_by: created_by.to_string(),
        })
    }
}
