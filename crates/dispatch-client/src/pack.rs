//! Packs a function's source (a file or a folder) into a tar.gz, deterministically: entries
//! sorted by path, mtime 0, owner 0, modes reduced to 0644/0755. The same files therefore give
//! the same bytes and the same source digest, so an unchanged function is never rebuilt.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// Folders never packed (VCS metadata and caches).
const SKIP: [&str; 3] = [".git", "__pycache__", ".DS_Store"];

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a file nor a folder")]
    NotFileOrDir(String),
    #[error("{0} holds no files to pack")]
    Empty(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A file becomes one top-level entry under its own name; a folder's contents become the
/// archive's top level.
pub fn pack_path(path: &Path) -> Result<Vec<u8>, PackError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    if meta.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| PackError::NotFileOrDir(path.display().to_string()))?;
        entries.push((name, path.to_path_buf()));
    } else if meta.is_dir() {
        walk(path, "", &mut entries)?;
    } else {
        return Err(PackError::NotFileOrDir(path.display().to_string()));
    }
    if entries.is_empty() {
        return Err(PackError::Empty(path.display().to_string()));
    }
    entries.sort();
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (name, file) in &entries {
        let m = fs::symlink_metadata(file).map_err(io_err(file))?;
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if m.file_type().is_symlink() {
            let target = fs::read_link(file).map_err(io_err(file))?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, name, &target).map_err(io_err(file))?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            let exec = m.permissions().mode() & 0o111 != 0;
            let data = fs::read(file).map_err(io_err(file))?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(if exec { 0o755 } else { 0o644 });
            b.append_data(&mut h, name, data.as_slice())
                .map_err(io_err(file))?;
        }
    }
    let gz = b.into_inner().map_err(io_err(path))?;
    let mut out = gz.finish().map_err(io_err(path))?;
    out.flush().map_err(io_err(path))?;
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), PackError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if SKIP.contains(&name.as_str()) {
            continue;
        }
        let path = entry.path();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ft = entry.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            walk(&path, &rel, out)?;
        } else if ft.is_file() || ft.is_symlink() {
            out.push((rel, path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(archive: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn packs_files_and_folders_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.py"), "x").unwrap();
        fs::create_dir_all(dir.path().join("lib/__pycache__")).unwrap();
        fs::write(dir.path().join("lib/a.py"), "y").unwrap();
        fs::write(dir.path().join("lib/__pycache__/a.pyc"), "z").unwrap();
        let a1 = pack_path(dir.path()).unwrap();
        assert_eq!(names(&a1), ["b.py", "lib/a.py"]);
        // Touching a file without changing it gives the same bytes.
        fs::write(dir.path().join("b.py"), "x").unwrap();
        assert_eq!(pack_path(dir.path()).unwrap(), a1);
        assert_eq!(
            names(&pack_path(&dir.path().join("lib/a.py")).unwrap()),
            ["a.py"]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(pack_path(empty.path()), Err(PackError::Empty(_))));
        assert!(matches!(
            pack_path(&dir.path().join("nope")),
            Err(PackError::Io { .. })
        ));
    }
}
