//! Function source archives (tar.gz): validation, listing and safe unpacking.
//!
//! Rejected (DESIGN §9): absolute paths, `..` components, links that leave the tree, hard
//! links, device files, and archives over the size and entry limits.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

/// Limits on what one archive may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 512 * 1024 * 1024;
pub const MAX_ENTRIES: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source archive is not a valid tar.gz: {0}")]
    Format(#[source] std::io::Error),
    #[error("source archive entry {path:?} is not allowed: {why}")]
    Unsafe { path: String, why: &'static str },
    #[error("source archive is too large: {0}")]
    TooLarge(String),
    #[error("failed to unpack source archive into {dir}")]
    Unpack {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// A regular file of an archive: its normalized relative path, whether it is executable and
/// its size (what `GET …/functions/{name}/source` answers for each).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceFile {
    pub path: String,
    pub executable: bool,
    /// Its size in bytes (as the archive says).
    pub size: u64,
}

/// Checks every entry of the archive and lists its regular files.
pub fn inspect(archive: &[u8]) -> Result<Vec<SourceFile>, SourceError> {
    let mut ar = tar::Archive::new(GzDecoder::new(archive));
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut count = 0usize;
    for entry in ar.entries().map_err(SourceError::Format)? {
        let entry = entry.map_err(SourceError::Format)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(SourceError::TooLarge(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let raw = entry.path().map_err(SourceError::Format)?.into_owned();
        let shown = raw.display().to_string();
        let rel = normalize(&raw).map_err(|why| SourceError::Unsafe {
            path: shown.clone(),
            why,
        })?;
        let header = entry.header();
        total = total.saturating_add(header.size().unwrap_or(0));
        if total > MAX_UNPACKED_BYTES {
            return Err(SourceError::TooLarge(format!(
                "more than {} MiB unpacked",
                MAX_UNPACKED_BYTES / 1024 / 1024
            )));
        }
        let kind = header.entry_type();
        if kind.is_file() || kind == tar::EntryType::Continuous {
            if let Some(p) = rel {
                let mode = header.mode().unwrap_or(0o644);
                files.push(SourceFile {
                    path: p.to_string_lossy().into_owned(),
                    executable: mode & 0o111 != 0,
                    size: header.size().unwrap_or(0),
                });
            }
        } else if kind.is_dir()
            || kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
        } else if kind.is_symlink() {
            let target =
                entry
                    .link_name()
                    .map_err(SourceError::Format)?
                    .ok_or(SourceError::Unsafe {
                        path: shown.clone(),
                        why: "symlink without a target",
                    })?;
            let base = rel
                .as_deref()
                .and_then(Path::parent)
                .unwrap_or(Path::new(""));
            if target.is_absolute() || !stays_within(&base.join(&target)) {
                return Err(SourceError::Unsafe {
                    path: shown,
                    why: "symlink points outside the source tree",
                });
            }
        } else if kind.is_hard_link() {
            return Err(SourceError::Unsafe {
                path: shown,
                why: "hard links are not supported",
            });
        } else {
            return Err(SourceError::Unsafe {
                path: shown,
                why: "only regular files, directories and symlinks are allowed",
            });
        }
    }
    Ok(files)
}

/// `a/./b` → `a/b`; refuses absolute paths and any `..`. `None` for the root itself.
fn normalize(p: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in a path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Whether a relative path, with `..` resolved lexically, stays inside the tree.
fn stays_within(p: &Path) -> bool {
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Validates the archive, then unpacks it into `dest` (which must not exist yet): first into
/// a sibling temporary directory, then renamed, so a crash never leaves half a tree at `dest`.
pub fn unpack(archive: &[u8], dest: &Path) -> Result<Vec<SourceFile>, SourceError> {
    let files = inspect(archive)?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    let unpack_err = |source| SourceError::Unpack {
        dir: dest.display().to_string(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(unpack_err)?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(unpack_err)?;
    let mut ar = tar::Archive::new(GzDecoder::new(archive));
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    for entry in ar.entries().map_err(SourceError::Format)? {
        let mut entry = entry.map_err(SourceError::Format)?;
        // `unpack_in` refuses paths escaping the directory as a second line of defence.
        entry.unpack_in(tmp.path()).map_err(unpack_err)?;
    }
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, dest) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        if !dest.is_dir() {
            return Err(unpack_err(e));
        }
        // Someone else unpacked the same digest first: theirs is identical.
    }
    Ok(files)
}

/// Reads a whole small stream (used by tests and the CLI to build archives).
pub fn read_all(mut r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};

    /// An archive of `(path, contents, mode)` regular files.
    pub fn archive(files: &[(&str, &str, u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (path, body, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, body.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn raw_archive(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
        // Build the header by hand: tar::Builder refuses unsafe names itself.
        let mut h = tar::Header::new_old();
        {
            let bytes = h.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                bytes.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut tar_bytes = h.as_bytes().to_vec();
        tar_bytes.extend_from_slice(&[0u8; 1024]);
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn lists_files_with_modes() {
        let a = archive(&[("hello.py", "x", 0o644), ("bin/run", "y", 0o755)]);
        let files = inspect(&a).unwrap();
        assert_eq!(
            files,
            vec![
                SourceFile {
                    path: "hello.py".into(),
                    executable: false,
                    size: 1,
                },
                SourceFile {
                    path: "bin/run".into(),
                    executable: true,
                    size: 1,
                },
            ]
        );
    }

    #[test]
    fn rejects_unsafe_entries() {
        let cases = [
            raw_archive("/etc/passwd", tar::EntryType::Regular, None),
            raw_archive("../x", tar::EntryType::Regular, None),
            raw_archive("a/../../x", tar::EntryType::Regular, None),
            raw_archive("link", tar::EntryType::Symlink, Some("/etc/passwd")),
            raw_archive("d/link", tar::EntryType::Symlink, Some("../../x")),
            raw_archive("hard", tar::EntryType::Link, Some("x")),
            raw_archive("dev", tar::EntryType::Char, None),
        ];
        for a in cases {
            let err = inspect(&a).unwrap_err();
            assert!(matches!(err, SourceError::Unsafe { .. }), "{err}");
        }
        let ok = raw_archive("d/link", tar::EntryType::Symlink, Some("../x"));
        inspect(&ok).unwrap();
        assert!(matches!(
            inspect(b"not gzip").unwrap_err(),
            SourceError::Format(_)
        ));
    }

    #[test]
    fn unpacks_atomically_and_keeps_modes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("fn");
        let a = archive(&[
            ("hello.py", "print(1)", 0o644),
            ("run.sh", "#!/bin/sh", 0o755),
        ]);
        unpack(&a, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("hello.py")).unwrap(),
            "print(1)"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0);
        // A second unpack of the same digest keeps the first tree.
        unpack(&a, &dest).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
