//! Fuzz targets of what the runtime reads from untrusted hands (dispatch_core::fuzz: seeded
//! and bounded here, long with `scripts/fuzz.sh MINUTES`): source archives from API callers
//! and protocol frames from user code's workers.

use std::io::Write;

use dispatch_core::fuzz::{Arbitrary, Unstructured, check};
use dispatch_runtime::protocol::{MAX_FRAME_BYTES, read_frame, write_frame};
use dispatch_runtime::source;

/// One tar entry, its name written raw (the tar crate's setters refuse `..`: an attacker's
/// archive does not use them).
fn entry(u: &mut Unstructured<'_>, tar: &mut Vec<u8>) -> dispatch_core::fuzz::Result<()> {
    const NAMES: &[&str] = &[
        "hello.py",
        "dir/",
        "dir/a.py",
        "../escape.py",
        "/etc/evil",
        "a/../../b",
        "./x",
        "",
        "link",
        "dir/../../../../tmp/pwn",
        "a//b",
        "\u{0}",
        ".",
        "..",
    ];
    let mut name = u.choose(NAMES)?.to_string();
    if u.ratio(1, 4)? {
        name.push_str(&String::arbitrary(u)?);
    }
    let kind = *u.choose(b"0521346xL")?;
    let body: Vec<u8> = Vec::arbitrary(u)?;
    let mut h = tar::Header::new_gnu();
    let raw = name.as_bytes();
    let n = raw.len().min(99);
    h.as_old_mut().name[..n].copy_from_slice(&raw[..n]);
    h.set_size(body.len() as u64);
    h.set_mode(*u.choose(&[0o644, 0o755, 0o4755, 0o777])?);
    h.set_entry_type(tar::EntryType::new(kind));
    let target = *u.choose(&["../../etc", "/etc/passwd", "hello.py", "dir"])?;
    let _ = h.set_link_name(target);
    if u.ratio(1, 8)? {
        // A lie about the size.
        h.set_size(u64::arbitrary(u)?);
    }
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(&body);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    Ok(())
}

/// Source archives: a refused one leaves nothing behind; an accepted one puts every file
/// under its folder, no link leaves it, and nothing appears outside.
#[test]
fn fuzz_source_archives() {
    let root = tempfile::tempdir().unwrap();
    let mut i = 0;
    check("source archives", |u| {
        let mut tar = Vec::new();
        if u.ratio(1, 5)? {
            tar = Vec::arbitrary(u)?;
        } else {
            for _ in 0..u.int_in_range(0..=6)? {
                entry(u, &mut tar)?;
            }
            tar.extend_from_slice(&[0u8; 1024]);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let archive = if u.ratio(1, 10)? {
            tar
        } else {
            gz.finish().unwrap()
        };
        i += 1;
        let case = root.path().join(format!("case{i}"));
        std::fs::create_dir(&case).unwrap();
        let dest = case.join("fn");
        match source::unpack(&archive, &dest) {
            Ok(files) => {
                for f in files {
                    // Names like `..x` are names; only a `..` component would climb.
                    let ok = std::path::Path::new(&f.path)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                    assert!(ok, "{f:?}");
                }
                for e in walk(&dest) {
                    let real = std::fs::canonicalize(&e).unwrap_or(e.clone());
                    assert!(
                        real.starts_with(dest.canonicalize().unwrap()),
                        "{e:?} leaves {dest:?}"
                    );
                }
            }
            Err(_) => assert!(!dest.exists(), "a refused archive left {dest:?}"),
        }
        let beside: Vec<_> = std::fs::read_dir(&case)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            beside.iter().all(|n| n == "fn"),
            "outside the folder: {beside:?}"
        );
        assert!(!root.path().join("escape.py").exists() && !root.path().join("b").exists());
        let _ = std::fs::remove_dir_all(&case);
        Ok(())
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// Worker frames: whatever a worker writes, the host reads whole frames within the size
/// bound or fails cleanly; what the host writes reads back the same.
#[test]
fn fuzz_protocol_frames() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    check("protocol frames", |u| {
        let stream: Vec<u8> = Vec::arbitrary(u)?;
        let bodies: Vec<Vec<u8>> = Vec::arbitrary(u)?;
        rt.block_on(async {
            let mut r = stream.as_slice();
            while let Ok(Some(frame)) = read_frame(&mut r).await {
                assert!(frame.len() <= MAX_FRAME_BYTES);
            }
            let mut buf = Vec::new();
            for b in &bodies {
                write_frame(&mut buf, b).await.unwrap();
            }
            let mut r = buf.as_slice();
            for b in &bodies {
                assert_eq!(
                    read_frame(&mut r).await.unwrap().as_deref(),
                    Some(b.as_slice())
                );
            }
            assert_eq!(read_frame(&mut r).await.unwrap(), None);
        });
        Ok(())
    });
}
