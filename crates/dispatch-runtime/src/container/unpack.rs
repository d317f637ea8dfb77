//! Layers applied to a root file system (OCI image spec, "Applying changesets"): entries in
//! order, `.wh.NAME` removes NAME of the layers below, `.wh..wh..opq` empties its directory of
//! what the layers below put there. Hostile archives are refused or defused: no entry is
//! written, linked or removed outside the root (every parent is resolved inside it, symlinks
//! included, as a chroot would); device nodes and FIFOs are skipped; set-uid and set-gid bits
//! are cleared (workloads run with `no_new_privs` anyway).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path (Linux's own limit).
const MAX_LINKS: usize = 40;

/// What applying a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub entries: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Device nodes and FIFOs left out.
    pub skipped: u64,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The entry's path as clean relative components; `..` anywhere is refused (an archive that
/// names it wants out).
fn clean(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "layer entry {} leaves the image's root ('..')",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

/// `rel` resolved inside `root` as the kernel would with `root` as `/`: symlinks are
/// followed, absolute targets start again at `root`, `..` stops at `root`. The last component
/// is followed too when `follow_last`.
pub fn resolve_in(root: &Path, rel: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut todo: Vec<PathBuf> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut at = PathBuf::new(); // relative to root
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part.as_os_str() == ".." {
            at.pop();
            continue;
        }
        let candidate = at.join(&part);
        let last = todo.is_empty();
        let meta = fs::symlink_metadata(root.join(&candidate));
        match meta {
            Ok(m) if m.file_type().is_symlink() && (!last || follow_last) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(bad(format!(
                        "too many symbolic links resolving {}",
                        rel.display()
                    )));
                }
                let target = fs::read_link(root.join(&candidate))?;
                if target.is_absolute() {
                    at = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(PathBuf::from(n)),
                        Component::ParentDir => todo.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            _ => at = candidate,
        }
    }
    Ok(root.join(at))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one uncompressed layer (`tar`) to `root`. Ownership is kept when `owners` (the
/// server runs as root), else files belong to the server.
pub fn apply_layer(root: &Path, tar: impl Read, owners: bool) -> io::Result<Applied> {
    let mut archive = tar::Archive::new(tar);
    let mut done = Applied::default();
    // What this layer wrote: an opaque marker keeps it.
    let mut written: HashSet<PathBuf> = HashSet::new();
    // Directory modes are set last: a read-only directory must still take its entries.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let rel = clean(&entry.path()?)?;
        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            continue; // the root itself ("./")
        };
        done.entries += 1;
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = resolve_in(root, parent_rel, true)?;
        let name_str = name.to_string_lossy();
        if name_str == OPAQUE {
            if parent.is_dir() {
                for child in fs::read_dir(&parent)? {
                    let child = child?;
                    if !written.contains(&parent_rel.join(child.file_name())) {
                        remove_any(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(bad(format!(
                    "layer entry {} is not a whiteout",
                    rel.display()
                )));
            }
            remove_any(&parent.join(hidden))?;
            continue;
        }
        if !parent.is_dir() {
            fs::create_dir_all(&parent)?;
        }
        let dest = parent.join(&name);
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode()? & 0o1777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mtime = header.mtime().unwrap_or(0);
        let existing = fs::symlink_metadata(&dest).ok();
        if kind.is_dir() {
            if !existing.as_ref().is_some_and(fs::Metadata::is_dir) {
                remove_any(&dest)?;
                fs::create_dir(&dest)?;
            }
            dir_modes.push((dest.clone(), mode));
        } else {
            if existing.is_some() {
                remove_any(&dest)?;
            }
            if kind.is_file() || kind == tar::EntryType::Continuous {
                let mut f = fs::File::create(&dest)?;
                done.bytes += io::copy(&mut entry, &mut f)?;
                f.set_permissions(fs::Permissions::from_mode(mode))?;
                // Kept: Python's compiled modules are valid only for their source's mtime.
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))?;
            } else if kind.is_symlink() {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| bad(format!("symlink {} has no target", rel.display())))?;
                symlink(&target, &dest)?;
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| bad(format!("hard link {} has no target", rel.display())))?;
                let source = resolve_in(root, &clean(&target)?, false)?;
                let is_file = fs::symlink_metadata(&source).map(|m| m.is_file());
                if !matches!(is_file, Ok(true)) {
                    return Err(bad(format!(
                        "hard link {} names {}, which is not a file of the image",
                        rel.display(),
                        target.display()
                    )));
                }
                fs::hard_link(&source, &dest)?;
            } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                done.skipped += 1;
                continue;
            } else {
                continue; // pax/GNU metadata entries are read by the tar crate itself
            }
        }
        if owners {
            std::os::unix::fs::lchown(&dest, Some(uid as u32), Some(gid as u32))?;
        }
        written.insert(rel);
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, path: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        // Raw bytes: tar::Builder refuses `..`, which the attacks need.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                E::Dir(p) => b.append(&header(tar::EntryType::Directory, p, 0), &[][..]),
                E::File(p, body) => b.append(
                    &header(tar::EntryType::Regular, p, body.len() as u64),
                    body.as_bytes(),
                ),
                E::Link(p, to) | E::Hard(p, to) => {
                    let kind = if matches!(e, E::Link(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    let mut h = header(kind, p, 0);
                    h.as_old_mut().linkname[..to.len()].copy_from_slice(to.as_bytes());
                    h.set_cksum();
                    b.append(&h, &[][..])
                }
                E::Fifo(p) => b.append(&header(tar::EntryType::Fifo, p, 0), &[][..]),
            }
            .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    #[test]
    fn whiteouts_opaque_dirs_links_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        apply_layer(
            &root,
            &layer(&[
                E::Dir("etc/"),
                E::File("etc/keep", "k"),
                E::File("etc/gone", "g"),
                E::Dir("var/"),
                E::File("var/old", "o"),
                E::Link("bin", "usr/bin"),
                E::Dir("usr/"),
                E::Dir("usr/bin/"),
                E::File("usr/bin/tool", "t1"),
                E::Hard("usr/bin/tool2", "usr/bin/tool"),
                E::Fifo("etc/fifo"),
            ])[..],
            false,
        )
        .unwrap();
        let second = apply_layer(
            &root,
            &layer(&[
                E::File("etc/.wh.gone", ""),
                E::Dir("var/"),
                E::File("var/.wh..wh..opq", ""),
                E::File("var/new", "n"),
                // Written through the image's own symlink: lands in usr/bin.
                E::File("bin/tool", "t2"),
            ])[..],
            false,
        )
        .unwrap();
        assert_eq!(read(&root.join("etc/keep")), "k");
        assert!(!root.join("etc/gone").exists(), "whiteout removes");
        assert!(
            !root.join("var/old").exists(),
            "opaque empties the lower layers' entries"
        );
        assert_eq!(
            read(&root.join("var/new")),
            "n",
            "opaque keeps its own layer's"
        );
        assert_eq!(read(&root.join("usr/bin/tool")), "t2");
        assert_eq!(
            read(&root.join("usr/bin/tool2")),
            "t1",
            "hard link kept the old inode"
        );
        assert!(!root.join("etc/fifo").exists(), "no FIFO or device nodes");
        assert_eq!(second.entries, 5);
    }

    #[test]
    fn hostile_layers_write_nothing_outside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        let outside = d.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), "safe").unwrap();
        let escape = outside.to_str().unwrap();
        // `..` in a name is refused outright.
        let e =
            apply_layer(&root, &layer(&[E::File("../outside/x", "pwn")])[..], false).unwrap_err();
        assert!(e.to_string().contains("leaves the image's root"), "{e}");
        // A symlink to the host, then a file, a whiteout and a hard link through it: all land
        // inside the root (the link is resolved as in a chroot).
        apply_layer(
            &root,
            &layer(&[
                E::Link("evil", escape),
                E::File("evil/victim", "pwn"),
                E::Link("up", "../../../../.."),
                E::File("up/x", "pwn"),
            ])[..],
            false,
        )
        .unwrap();
        apply_layer(&root, &layer(&[E::File("evil/.wh.victim", "")])[..], false).unwrap();
        let hard = apply_layer(
            &root,
            &layer(&[E::Hard("h", &format!("{escape}/victim"))])[..],
            false,
        );
        assert!(hard.is_err(), "a hard link to a host file is refused");
        assert_eq!(read(&outside.join("victim")), "safe");
        assert!(!d.path().join("x").exists());
        assert!(
            root.join("x").exists(),
            "`..` through a link stops at the root"
        );
    }

    #[test]
    fn files_keep_their_mtimes() {
        // Python's compiled modules are valid only for their source's mtime: an image whose
        // files came out "now" would compile its standard library at every cold start.
        let d = tempfile::tempdir().unwrap();
        let mut h = header(tar::EntryType::Regular, "os.py", 1);
        h.set_mtime(1_745_849_508);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        apply_layer(d.path(), &b.into_inner().unwrap()[..], false).unwrap();
        let m = fs::metadata(d.path().join("os.py"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(
            m.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            1_745_849_508
        );
    }

    #[test]
    fn setuid_bits_are_cleared() {
        let d = tempfile::tempdir().unwrap();
        let mut h = header(tar::EntryType::Regular, "su", 1);
        h.set_mode(0o4755);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        apply_layer(d.path(), &b.into_inner().unwrap()[..], false).unwrap();
        let mode = fs::metadata(d.path().join("su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
}
