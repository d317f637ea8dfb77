//! Sandboxes for every process that runs user code (DESIGN §9).
//!
//! The server never builds a sandbox inside its own multi-threaded process: it starts its own
//! binary as a single-threaded launcher (`dispatch sandbox PLAN -- PROGRAM ARGS…`, see
//! [`launch`]) that sets the sandbox up and execs the workload. This module is the server's
//! side: what the kernel offers ([`Sandboxes::new`] fails closed when a layer is missing),
//! the shape of one sandbox ([`Jail`]: what it shows, its limits, its identity), the
//! launcher's command line ([`Jail::command`]), and the cgroups that hold the limits
//! ([`cgroup`]).
//!
//! A sandbox shows, read-only and at their own paths: the system directories (`/usr`, `/bin`,
//! `/lib*`, `/etc`), the interpreters' installations, and what its workload needs (a
//! function's own code, its image's dependencies, the runtime bootstraps); writable: a private
//! size-capped `/tmp` and the binds the plan marks writable (a job's scratch folder, an image
//! build). Nothing else of the host, the data dir or other tenants exists inside.

pub mod cgroup;
pub mod launch;
pub mod walls;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use cgroup::Cgroup;

/// How user code runs on this server (`dispatch server --isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces, a minimal root, an unprivileged identity, cgroup limits, Landlock, seccomp.
    #[default]
    Sandbox,
    /// User code runs as the server, with its identity and files (development only).
    None,
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sandbox" => Ok(Isolation::Sandbox),
            "none" => Ok(Isolation::None),
            other => Err(format!(
                "unknown isolation {other:?}: use sandbox (the default) or none"
            )),
        }
    }
}

/// A path of the host shown inside a sandbox at the same place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// What the host has (symlinks resolved).
    pub src: PathBuf,
    /// Where it appears inside.
    pub dst: PathBuf,
    pub rw: bool,
}

/// Who the workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Identity {
    /// A server running as root: a uid and gid of the workload's namespace.
    Uid { uid: u32, gid: u32 },
    /// An unprivileged server: a user namespace where the workload is root without
    /// capabilities (the server's own uid outside).
    UserNamespace,
}

/// Everything the launcher needs (serialized as its first argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// An empty directory the new root is mounted on (in the launcher's mount namespace).
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    pub tmp_bytes: u64,
    pub network: bool,
    pub identity: Identity,
    /// `cgroup.procs` files the launcher writes its pid into.
    pub cgroups: Vec<PathBuf>,
    pub cwd: PathBuf,
    /// PATH inside the sandbox (the program is looked up on it).
    pub env_path: String,
    pub hostname: String,
    pub landlock: bool,
    pub seccomp: bool,
}

/// Resource limits of one workload process tree (`spec.resources`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (resident + page cache charged to it).
    pub memory: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU in thousandths of a core; `None`: unlimited.
    pub cpu_millis: Option<u64>,
    /// Size of the private `/tmp`.
    pub tmp: u64,
}

pub const MIB: u64 = 1024 * 1024;

impl Default for Limits {
    /// A function's defaults: 256 MiB, 128 processes, 64 MiB of `/tmp`, no CPU cap.
    fn default() -> Self {
        Limits {
            memory: 256 * MIB,
            pids: 128,
            cpu_millis: None,
            tmp: 64 * MIB,
        }
    }
}

impl Limits {
    /// Job commands: 1 GiB, 256 processes, 256 MiB of `/tmp`.
    pub fn job() -> Self {
        Limits {
            memory: 1024 * MIB,
            pids: 256,
            cpu_millis: None,
            tmp: 256 * MIB,
        }
    }

    /// Image builds (pip, npm): 2 GiB, 512 processes, 1 GiB of `/tmp` for downloads.
    pub fn build() -> Self {
        Limits {
            memory: 2048 * MIB,
            pids: 512,
            cpu_millis: None,
            tmp: 1024 * MIB,
        }
    }
}

/// Layers an operator lowered explicitly (`--sandbox-without`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lowered {
    pub landlock: bool,
    pub seccomp: bool,
    pub cgroups: bool,
}

impl std::str::FromStr for Lowered {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut l = Lowered::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "landlock" => l.landlock = true,
                "seccomp" => l.seccomp = true,
                "cgroups" => l.cgroups = true,
                other => {
                    return Err(format!(
                        "unknown sandbox layer {other:?}: the layers that may be lowered are landlock, seccomp and cgroups"
                    ));
                }
            }
        }
        Ok(l)
    }
}

/// Directories of the host every sandbox shows read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// First uid (and gid) given to namespaces when the server runs as root.
pub const UID_BASE: u32 = 2_000_000_000;

/// The server's sandboxes: what the kernel offers and the settings every sandbox shares.
#[derive(Debug)]
pub struct Sandboxes {
    launcher: PathBuf,
    root: PathBuf,
    system: Vec<Bind>,
    env_path: String,
    lowered: Lowered,
    cgroups: Option<cgroup::Roots>,
    as_root: bool,
    uids: Mutex<HashMap<String, u32>>,
}

impl Sandboxes {
    /// Sandboxes started with `launcher` (the `dispatch` binary), their mount point under
    /// `data_dir/sandbox`. Fails with what is missing when the kernel lacks a layer that was
    /// not lowered; [`Sandboxes::check`] then proves a real sandbox starts.
    pub fn new(launcher: PathBuf, data_dir: &Path, lowered: Lowered) -> Result<Self, String> {
        if !launcher.is_file() {
            return Err(format!(
                "the sandbox launcher {} does not exist",
                launcher.display()
            ));
        }
        let root = data_dir.join("sandbox").join("root");
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let as_root = nix::unistd::geteuid().is_root();
        let cgroups = if lowered.cgroups {
            None
        } else {
            Some(cgroup::Roots::detect().map_err(|e| {
                format!(
                    "{e} (lower the layer with --sandbox-without cgroups to run without limits)"
                )
            })?)
        };
        if !lowered.landlock {
            let abi = landlock_abi();
            if abi < 6 {
                return Err(format!(
                    "this kernel offers Landlock ABI {abi}, the sandbox needs 6 or later (lower the layer with --sandbox-without landlock)"
                ));
            }
        }
        if !lowered.seccomp {
            walls::filters()?;
        }
        let mut system: Vec<Bind> = SYSTEM_DIRS
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .map(|p| Bind {
                src: p.to_path_buf(),
                dst: p.to_path_buf(),
                rw: false,
            })
            .collect();
        let mut bins = Vec::new();
        for prefix in toolchains() {
            bins.push(prefix.join("bin"));
            if !system.iter().any(|b| prefix.starts_with(&b.dst)) {
                system.push(Bind {
                    src: prefix.clone(),
                    dst: prefix,
                    rw: false,
                });
            }
        }
        let host_path = std::env::var("PATH").unwrap_or_default();
        let visible = |d: &Path| system.iter().any(|b| d.starts_with(&b.dst));
        let mut path: Vec<String> = Vec::new();
        for d in bins
            .into_iter()
            .chain(std::env::split_paths(&host_path))
            .chain(["/usr/local/bin", "/usr/bin", "/bin"].map(PathBuf::from))
        {
            let s = d.display().to_string();
            if visible(&d) && !path.contains(&s) {
                path.push(s);
            }
        }
        Ok(Sandboxes {
            launcher,
            root,
            system,
            env_path: path.join(":"),
            lowered,
            cgroups,
            as_root,
            uids: Mutex::new(HashMap::new()),
        })
    }

    /// One line for the server's start-up log: which layers are on.
    pub fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "OFF (lowered)" };
        format!(
            "isolation sandbox: mount, PID, IPC and UTS namespaces; identity {}; cgroups {}; landlock {}; seccomp {}",
            if self.as_root {
                "a uid per namespace"
            } else {
                "a user namespace"
            },
            match &self.cgroups {
                Some(r) => r.describe(),
                None => on(false).to_string(),
            },
            on(!self.lowered.landlock),
            on(!self.lowered.seccomp),
        )
    }

    /// Starts `true` in a default sandbox: the proof that every layer works here.
    pub async fn check(self: &Arc<Self>) -> Result<(), String> {
        let jail = self.jail(
            "dispatch-check",
            Vec::new(),
            Vec::new(),
            Limits::default(),
            true,
        );
        let (mut cmd, _cg) = jail
            .command(Path::new("true"), &[], Path::new("/"))
            .map_err(|e| format!("cannot prepare a sandbox: {e}"))?;
        let out = cmd
            .env_clear()
            .output()
            .await
            .map_err(|e| format!("cannot start the sandbox launcher: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(format!("a test sandbox failed ({}): {said}", out.status))
    }

    /// PATH inside every sandbox.
    pub fn env_path(&self) -> &str {
        &self.env_path
    }

    /// `program` as a sandbox showing `binds` sees it: itself when it is visible inside, else
    /// the program of the same name on the sandbox's PATH (a pyenv shim becomes the
    /// interpreter it runs).
    fn resolve_program(&self, binds: &[Bind], program: &Path) -> PathBuf {
        if !program.is_absolute() || binds.iter().any(|b| program.starts_with(&b.dst)) {
            return program.to_path_buf();
        }
        let Some(name) = program.file_name() else {
            return program.to_path_buf();
        };
        self.env_path
            .split(':')
            .map(|d| Path::new(d).join(name))
            .find(|c| c.is_file())
            .unwrap_or_else(|| program.to_path_buf())
    }

    /// The identity of namespace `ns`'s workloads.
    pub fn identity(&self, ns: &str) -> Identity {
        if !self.as_root {
            return Identity::UserNamespace;
        }
        let mut uids = self.uids.lock();
        let next = UID_BASE + uids.len() as u32;
        let uid = *uids.entry(ns.to_string()).or_insert(next);
        Identity::Uid { uid, gid: uid }
    }

    /// A sandbox for namespace `ns`'s workloads showing `ro` read-only and `rw` writable
    /// (each at its own path, or `(src, dst)`), with `limits`; `network: false` gives an empty
    /// network namespace.
    pub fn jail(
        self: &Arc<Self>,
        ns: &str,
        ro: Vec<PathBuf>,
        rw: Vec<(PathBuf, PathBuf)>,
        limits: Limits,
        network: bool,
    ) -> Jail {
        let mut binds = self.system.clone();
        for p in ro {
            let src = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            binds.push(Bind {
                src,
                dst: p,
                rw: false,
            });
        }
        for (src, dst) in rw {
            let src = std::fs::canonicalize(&src).unwrap_or(src);
            binds.push(Bind { src, dst, rw: true });
        }
        Jail {
            boxes: self.clone(),
            namespace: ns.to_string(),
            binds,
            limits,
            network,
        }
    }
}

/// The Landlock ABI this kernel offers (0: none).
fn landlock_abi() -> i32 {
    // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) is what the crate asks;
    // its compatibility layer answers it.
    use landlock::{ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr};
    for (abi, n) in [(ABI::V6, 6), (ABI::V5, 5), (ABI::V4, 4), (ABI::V1, 1)].into_iter() {
        let ok = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.create())
            .is_ok();
        if ok {
            return n;
        }
    }
    0
}

/// Installation prefixes of the interpreters on the server's PATH (a pyenv or /opt Python,
/// say), shown read-only in every sandbox.
fn toolchains() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(py) = crate::host::find_program("python3")
        && let Ok(o) = std::process::Command::new(py)
            .args(["-c", "import sys; print(sys.base_prefix)"])
            .output()
        && o.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if p.is_absolute() {
            out.push(p);
        }
    }
    if let Some(node) = crate::host::find_program("node")
        && let Ok(real) = std::fs::canonicalize(node)
        && let Some(prefix) = real.parent().and_then(Path::parent)
    {
        out.push(prefix.to_path_buf());
    }
    out
}

/// One sandbox shape: what its workloads see, their limits and identity. Each
/// [`Jail::command`] starts a new sandbox of this shape.
#[derive(Debug, Clone)]
pub struct Jail {
    boxes: Arc<Sandboxes>,
    pub namespace: String,
    binds: Vec<Bind>,
    pub limits: Limits,
    pub network: bool,
}

impl Jail {
    pub fn sandboxes(&self) -> &Arc<Sandboxes> {
        &self.boxes
    }

    /// The uid and gid the workloads run as (root server), for files they must write.
    pub fn owner(&self) -> Option<(u32, u32)> {
        match self.boxes.identity(&self.namespace) {
            Identity::Uid { uid, gid } => Some((uid, gid)),
            Identity::UserNamespace => None,
        }
    }

    /// Makes `path` (a writable bind) the workloads' own.
    pub fn hand_over(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.owner() {
            chown_tree(path, uid, gid)?;
        }
        Ok(())
    }

    /// A cgroup with this jail's limits, or none when cgroups were lowered.
    pub fn cgroup(&self, what: &str) -> std::io::Result<Option<Cgroup>> {
        let Some(roots) = &self.boxes.cgroups else {
            return Ok(None);
        };
        // One counter per process: every `Sandboxes` of it shares the `dispatch-<pid>` folder.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Cgroup::create(roots, &format!("{what}-{n}"), &self.limits).map(Some)
    }

    /// The launcher command that runs `program args` in a new sandbox of this shape with
    /// working directory `cwd`, and the cgroup it joins. The caller sets the environment and
    /// stdio as for the program itself (PATH becomes the sandbox's).
    pub fn command(
        &self,
        program: &Path,
        args: &[String],
        cwd: &Path,
    ) -> std::io::Result<(tokio::process::Command, Option<Cgroup>)> {
        let cg = self.cgroup("sandbox")?;
        let plan = Plan {
            root: self.boxes.root.clone(),
            binds: self.binds.clone(),
            tmp_bytes: self.limits.tmp,
            network: self.network,
            identity: self.boxes.identity(&self.namespace),
            cgroups: cg.as_ref().map(Cgroup::procs).unwrap_or_default(),
            cwd: cwd.to_path_buf(),
            env_path: self.boxes.env_path.clone(),
            hostname: "dispatch".into(),
            landlock: !self.boxes.lowered.landlock,
            seccomp: !self.boxes.lowered.seccomp,
        };
        let plan = serde_json::to_string(&plan).map_err(std::io::Error::other)?;
        let mut cmd = tokio::process::Command::new(&self.boxes.launcher);
        cmd.arg("sandbox")
            .arg(plan)
            .arg("--")
            .arg(self.boxes.resolve_program(&self.binds, program))
            .args(args)
            .env("PATH", &self.boxes.env_path);
        Ok((cmd, cg))
    }

    /// Gives a process forked inside one of this jail's sandboxes (a zygote's worker, host
    /// pid `pid`) a cgroup of its own with this jail's limits.
    pub fn adopt(&self, pid: i32) -> std::io::Result<Option<Cgroup>> {
        let Some(cg) = self.cgroup("worker")? else {
            return Ok(None);
        };
        cg.add(pid)?;
        Ok(Some(cg))
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The host pid of the process that is `inner` in the PID namespace of a sandbox whose
/// launcher is host pid `launcher` (a zygote answers with the pids it sees).
pub fn host_pid(launcher: u32, inner: i32) -> Option<i32> {
    let mut frontier = vec![launcher as i32];
    for _ in 0..3 {
        let mut next = Vec::new();
        for pid in frontier {
            for child in children(pid) {
                if ns_pid(child) == Some(inner) {
                    return Some(child);
                }
                next.push(child);
            }
        }
        frontier = next;
    }
    None
}

fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The pid a process has in its own (innermost) PID namespace.
fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    if fields.len() < 2 {
        return None;
    }
    fields.last()?.parse().ok()
}

#[cfg(test)]
mod tests;
