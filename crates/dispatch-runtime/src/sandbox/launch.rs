//! The sandbox launcher (DESIGN §9): `dispatch sandbox PLAN -- PROGRAM ARGS…`, the binary
//! re-executed by the server, single-threaded, before any runtime or logger exists.
//!
//! It joins the cgroups the server made for it, unshares the namespaces, builds a minimal root
//! in a tmpfs (system directories, the plan's paths at their own places, a private `/tmp`, a
//! few device nodes), then forks: the child is PID 1 of the new PID namespace; it mounts
//! `/proc`, pivots into the new root, drops every privilege (identity, capabilities,
//! `no_new_privs`), applies Landlock and seccomp, and execs the workload. The launcher stays
//! outside as the workload's parent and exits with its status; killing the launcher kills
//! the workload (the parent-death signal), and with it the whole PID namespace.
//!
//! This is the one module of the workspace that may use `unsafe`: `fork` (safe here: the
//! launcher has one thread) and adopting the pipe fd across it.

#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid};

use super::{Bind, Identity, Plan};

/// Exit status of a launcher whose sandbox could not be built (the workload never ran).
pub const SETUP_FAILED: u8 = 125;

/// Device nodes bound into the sandbox's `/dev`.
pub(super) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Runs the launcher with `args` = everything after `dispatch sandbox`. Never returns.
pub fn main(args: Vec<std::ffi::OsString>) -> ! {
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dispatch sandbox: {e}");
            i32::from(SETUP_FAILED)
        }
    };
    std::process::exit(code)
}

type Res<T> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> Res<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn run(args: Vec<std::ffi::OsString>) -> Res<i32> {
    let mut it = args.into_iter();
    let plan = it
        .next()
        .ok_or("usage: dispatch sandbox PLAN -- PROGRAM [ARGS…]")?;
    let plan: Plan = ctx(serde_json::from_slice(plan.as_bytes()), || {
        "the sandbox plan is not valid".into()
    })?;
    if it.next().as_deref() != Some(OsStr::new("--")) {
        return Err("expected -- before the program".into());
    }
    let argv: Vec<std::ffi::OsString> = it.collect();
    if argv.is_empty() {
        return Err("no program to run".into());
    }

    // Before any fork: the workload inherits it (the server protects itself at start).
    let _ = std::fs::write(
        "/proc/self/oom_score_adj",
        crate::worker::WORKER_OOM_SCORE_ADJ,
    );
    for procs in &plan.cgroups {
        let me = std::process::id().to_string();
        ctx(std::fs::write(procs, me), || {
            format!("cgroups: cannot join {}", procs.display())
        })?;
    }

    let outside_uid = nix::unistd::geteuid();
    let outside_gid = nix::unistd::getegid();
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !plan.network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if plan.identity == Identity::UserNamespace {
        ctx(unshare(CloneFlags::CLONE_NEWUSER), || {
            "user namespace: unshare failed (does the kernel allow unprivileged user namespaces?)"
                .into()
        })?;
        ctx(std::fs::write("/proc/self/setgroups", "deny"), || {
            "user namespace: setgroups".into()
        })?;
        ctx(
            std::fs::write("/proc/self/uid_map", format!("0 {outside_uid} 1")),
            || "user namespace: uid_map".into(),
        )?;
        ctx(
            std::fs::write("/proc/self/gid_map", format!("0 {outside_gid} 1")),
            || "user namespace: gid_map".into(),
        )?;
    }
    ctx(unshare(flags), || "namespaces: unshare failed".into())?;
    build_root(&plan)?;

    // The child learns of the launcher's death through this pipe as well as the signal.
    let (alive_r, alive_w) = ctx(std::io::pipe(), || "pipe".into())?;
    // SAFETY: the launcher is single-threaded (nothing has started a thread: no runtime, no
    // logger), so the child may do anything after fork, including allocate.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(alive_w);
            let e = child(&plan, &argv, alive_r);
            eprintln!("dispatch sandbox: {e}");
            std::process::exit(i32::from(SETUP_FAILED));
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_r);
            let _keep = alive_w;
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waitpid: {e}")),
                }
            }
        }
    }
}

/// Mounts the new root at `plan.root`, in the launcher's own mount namespace.
fn build_root(plan: &Plan) -> Res<()> {
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        || "mounts: cannot make / private".into(),
    )?;
    let root = &plan.root;
    ctx(
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=1m,mode=0755"),
        ),
        || format!("mounts: tmpfs on {}", root.display()),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // A private, size-capped /tmp first: binds of paths below /tmp go on top of it.
    let tmp = inside(Path::new("/tmp"));
    mkdirs(&tmp)?;
    let size = format!("size={},mode=1777", plan.tmp_bytes.max(4096));
    ctx(
        mount(
            Some("tmpfs"),
            &tmp,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(size.as_str()),
        ),
        || "mounts: tmpfs on /tmp".into(),
    )?;
    // Binds sorted by depth, so that a parent is mounted before what is bound inside it.
    let mut binds: Vec<&Bind> = plan.binds.iter().collect();
    binds.sort_by_key(|b| b.dst.components().count());
    for b in binds {
        let target = inside(&b.dst);
        let meta = match std::fs::symlink_metadata(&b.src) {
            Ok(m) => m,
            Err(_) => continue, // an optional system directory this host lacks
        };
        if meta.file_type().is_symlink() {
            // `/bin -> usr/bin` on merged-/usr systems: the same link inside.
            let to = ctx(std::fs::read_link(&b.src), || {
                format!("mounts: readlink {}", b.src.display())
            })?;
            mkdirs(target.parent().unwrap_or(root))?;
            if std::fs::symlink_metadata(&target).is_err() {
                ctx(std::os::unix::fs::symlink(&to, &target), || {
                    format!("mounts: symlink {}", target.display())
                })?;
            }
            continue;
        }
        if meta.is_dir() {
            mkdirs(&target)?;
        } else {
            mkdirs(target.parent().unwrap_or(root))?;
            if std::fs::symlink_metadata(&target).is_err() {
                ctx(std::fs::write(&target, b""), || {
                    format!("mounts: file {}", target.display())
                })?;
            }
        }
        bind(&b.src, &target, b.rw)?;
    }
    let dev = inside(Path::new("/dev"));
    mkdirs(&dev)?;
    ctx(
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("size=64k,mode=0755"),
        ),
        || "mounts: tmpfs on /dev".into(),
    )?;
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        if !host.exists() {
            continue;
        }
        let node = dev.join(d);
        ctx(std::fs::write(&node, b""), || format!("mounts: /dev/{d}"))?;
        bind(&host, &node, true)?;
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(std::os::unix::fs::symlink(to, dev.join(name)), || {
            format!("mounts: /dev/{name}")
        })?;
    }
    let shm = dev.join("shm");
    mkdirs(&shm)?;
    ctx(
        mount(
            Some("tmpfs"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(size.as_str()),
        ),
        || "mounts: tmpfs on /dev/shm".into(),
    )?;
    mkdirs(&inside(Path::new("/proc")))?;
    Ok(())
}

fn mkdirs(p: &Path) -> Res<()> {
    ctx(std::fs::create_dir_all(p), || {
        format!("mounts: mkdir {}", p.display())
    })
}

/// Binds `src` on `target`; read-only unless `rw`; never set-uid or device files.
fn bind(src: &Path, target: &Path, rw: bool) -> Res<()> {
    let what = || format!("mounts: bind {}", src.display());
    ctx(
        mount(
            Some(src),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        what,
    )?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    if !rw {
        flags |= MsFlags::MS_RDONLY;
    }
    if !src.starts_with("/dev") {
        flags |= MsFlags::MS_NODEV;
    }
    // In a user namespace the source mount's own restrictions are locked: keep them.
    if let Ok(st) = nix::sys::statvfs::statvfs(src) {
        use nix::sys::statvfs::FsFlags;
        let f = st.flags();
        for (has, add) in [
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        ] {
            if f.contains(has) {
                flags |= add;
            }
        }
    }
    ctx(
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>),
        what,
    )
}

/// PID 1 of the sandbox: finishes the root, drops privileges and execs. Returns only on error.
fn child(plan: &Plan, argv: &[std::ffi::OsString], alive: std::io::PipeReader) -> String {
    match child_setup(plan, argv, alive) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn child_setup(
    plan: &Plan,
    argv: &[std::ffi::OsString],
    alive: std::io::PipeReader,
) -> Res<std::convert::Infallible> {
    ctx(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL), || {
        "parent-death signal".into()
    })?;
    // The launcher may have died before the signal was armed: then the pipe is at its end.
    {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            alive.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
            std::process::exit(i32::from(SETUP_FAILED));
        }
    }
    drop(alive);
    let root = &plan.root;
    let proc_dir = root.join("proc");
    ctx(
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
        || "mounts: proc".into(),
    )?;
    ctx(nix::unistd::sethostname(&plan.hostname), || {
        "hostname".into()
    })?;
    // pivot_root(".", "."): the old root ends up stacked under the new one, then detached.
    ctx(nix::unistd::chdir(root), || "chdir to the new root".into())?;
    ctx(nix::unistd::pivot_root(".", "."), || "pivot_root".into())?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching the old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())?;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
            None::<&str>,
        ),
        || "read-only root".into(),
    )?;

    // Identity and capabilities.
    ctx(caps::clear(None, caps::CapSet::Bounding), || {
        "capabilities: bounding set".into()
    })?;
    ctx(caps::clear(None, caps::CapSet::Ambient), || {
        "capabilities: ambient set".into()
    })?;
    ctx(caps::clear(None, caps::CapSet::Inheritable), || {
        "capabilities: inheritable set".into()
    })?;
    if let Identity::Uid { uid, gid } = plan.identity {
        ctx(nix::unistd::setgroups(&[]), || "setgroups".into())?;
        let g = Gid::from_raw(gid);
        ctx(nix::unistd::setresgid(g, g, g), || "setresgid".into())?;
        let u = Uid::from_raw(uid);
        ctx(nix::unistd::setresuid(u, u, u), || "setresuid".into())?;
    }
    ctx(caps::clear(None, caps::CapSet::Effective), || {
        "capabilities: effective set".into()
    })?;
    ctx(caps::clear(None, caps::CapSet::Permitted), || {
        "capabilities: permitted set".into()
    })?;
    ctx(nix::sys::prctl::set_no_new_privs(), || {
        "no_new_privs".into()
    })?;
    ctx(nix::unistd::chdir(&plan.cwd), || {
        format!("working directory {}", plan.cwd.display())
    })?;
    let program = resolve(&argv[0], &plan.env_path)
        .ok_or_else(|| format!("{}: not found in the sandbox", argv[0].to_string_lossy()))?;
    if plan.landlock {
        super::walls::landlock(plan)?;
    }
    if plan.seccomp {
        super::walls::seccomp()?;
    }
    let c = |s: &OsStr| CString::new(s.as_bytes()).map_err(|e| e.to_string());
    let path = c(program.as_os_str())?;
    let args = argv.iter().map(|a| c(a)).collect::<Res<Vec<_>>>()?;
    let env = std::env::vars_os()
        .filter(|(k, _)| k != "PATH")
        .chain([("PATH".into(), plan.env_path.clone().into())])
        .map(|(k, v): (std::ffi::OsString, std::ffi::OsString)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            c(&kv)
        })
        .collect::<Res<Vec<_>>>()?;
    let e = nix::unistd::execve(&path, &args, &env).unwrap_err();
    Err(format!("exec {}: {e}", program.display()))
}

/// `program` as given when it has a slash, else the first executable of that name on `path`.
fn resolve(program: &OsStr, path: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return Some(p.to_path_buf());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(p))
        .find(|c| {
            std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
