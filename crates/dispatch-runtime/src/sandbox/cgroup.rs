//! cgroups that hold a sandbox's limits (memory, processes, CPU), v1 and v2.
//!
//! The server makes one folder of its own (`dispatch-<pid>`) below its cgroup in each
//! hierarchy it uses (v1: `memory`, `pids`, `cpu`; v2: the unified one) and one cgroup per
//! workload below that. v1 and v2 are detected from `/proc/self/mountinfo` and
//! `/proc/self/cgroup`; a hybrid host (v1 controllers, an empty v2 tree) uses v1.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};

use super::Limits;

/// Cgroup folders that still had a process when dropped; removed on a later try.
static LEFTOVERS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

#[derive(Debug, Clone)]
pub enum Roots {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    V2 {
        dir: PathBuf,
    },
}

/// Where each hierarchy is mounted and which controllers it has.
fn mounts() -> Vec<(PathBuf, bool, Vec<String>)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let _source = r.next()?;
            let opts = r.next().unwrap_or("");
            match fstype {
                "cgroup" => Some((
                    PathBuf::from(mount_point),
                    false,
                    opts.split(',').map(str::to_string).collect(),
                )),
                "cgroup2" => Some((PathBuf::from(mount_point), true, Vec::new())),
                _ => None,
            }
        })
        .collect()
}

/// This process's cgroup path in the hierarchy with `controller` (v1), or the unified one
/// (`None`).
fn own_path(controller: Option<&str>) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let ctrls = parts.next()?;
        let path = parts.next()?;
        let hit = match controller {
            Some(c) => ctrls.split(',').any(|x| x == c),
            None => ctrls.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

fn join(mount: &Path, own: &str) -> PathBuf {
    mount.join(own.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Roots {
    /// Finds the hierarchies and makes the server's folder in each.
    pub fn detect() -> Result<Roots, String> {
        let mounts = mounts();
        let folder = format!("dispatch-{}", std::process::id());
        let v1 = |c: &str| -> Option<PathBuf> {
            let (m, _, _) = mounts
                .iter()
                .find(|(_, v2, opts)| !v2 && opts.iter().any(|o| o == c))?;
            Some(join(m, &own_path(Some(c))?).join(&folder))
        };
        let roots = match (v1("memory"), v1("pids")) {
            (Some(memory), Some(pids)) => Roots::V1 {
                memory,
                pids,
                cpu: v1("cpu"),
            },
            _ => {
                let (m, _, _) = mounts.iter().find(|(_, v2, _)| *v2).ok_or(
                    "cgroups: neither the v1 memory and pids controllers nor a cgroup v2 tree is mounted",
                )?;
                let own = join(m, &own_path(None).unwrap_or_default());
                let have =
                    std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
                for c in ["memory", "pids"] {
                    if !have.split_whitespace().any(|x| x == c) {
                        return Err(format!(
                            "cgroups: the {c} controller is not delegated to {} (cgroup v2)",
                            own.display()
                        ));
                    }
                }
                Roots::V2 {
                    dir: own.join(&folder),
                }
            }
        };
        for d in roots.dirs() {
            if let Some(parent) = d.parent() {
                remove_stale(parent);
            }
            std::fs::create_dir_all(&d).map_err(|e| {
                format!(
                    "cgroups: cannot create {}: {e} (is the hierarchy writable?)",
                    d.display()
                )
            })?;
        }
        if let Roots::V2 { dir } = &roots {
            let enable = |d: &Path| write(&d.join("cgroup.subtree_control"), "+memory +pids");
            if let Some(parent) = dir.parent() {
                enable(parent).map_err(|e| {
                    format!("cgroups: cannot delegate memory and pids below the server's cgroup: {e} (run the server in a cgroup of its own, e.g. systemd Delegate=yes)")
                })?;
            }
            enable(dir).map_err(|e| format!("cgroups: {e}"))?;
        }
        Ok(roots)
    }

    fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Roots::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.clone(), pids.clone()];
                v.extend(cpu.clone());
                v
            }
            Roots::V2 { dir } => vec![dir.clone()],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Roots::V1 { cpu, .. } => format!(
                "v1 (memory, pids{})",
                if cpu.is_some() { ", cpu" } else { "" }
            ),
            Roots::V2 { .. } => "v2 (memory, pids, cpu)".into(),
        }
    }
}

/// One workload's cgroup (a folder in each hierarchy); removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    memory: PathBuf,
    v2: bool,
    /// The memory limit, for messages.
    pub memory_limit: u64,
}

impl Cgroup {
    pub fn create(roots: &Roots, name: &str, limits: &Limits) -> std::io::Result<Cgroup> {
        retry_leftovers();
        let mut cg = Cgroup {
            dirs: Vec::new(),
            memory: PathBuf::new(),
            v2: matches!(roots, Roots::V2 { .. }),
            memory_limit: limits.memory,
        };
        let mk = |base: &Path| -> std::io::Result<PathBuf> {
            let d = base.join(name);
            std::fs::create_dir(&d)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
            Ok(d)
        };
        match roots {
            Roots::V1 { memory, pids, cpu } => {
                let m = mk(memory)?;
                cg.dirs.push(m.clone());
                cg.memory = m.clone();
                write(&m.join("memory.limit_in_bytes"), &limits.memory.to_string())?;
                // No swap to escape into (the file exists only with swap accounting).
                let sw = m.join("memory.memsw.limit_in_bytes");
                if sw.exists() {
                    write(&sw, &limits.memory.to_string())?;
                }
                let p = mk(pids)?;
                cg.dirs.push(p.clone());
                write(&p.join("pids.max"), &limits.pids.to_string())?;
                if let (Some(cpu), Some(millis)) = (cpu, limits.cpu_millis) {
                    let c = mk(cpu)?;
                    cg.dirs.push(c.clone());
                    write(&c.join("cpu.cfs_period_us"), "100000")?;
                    write(&c.join("cpu.cfs_quota_us"), &(millis * 100).to_string())?;
                }
            }
            Roots::V2 { dir } => {
                let d = mk(dir)?;
                cg.dirs.push(d.clone());
                cg.memory = d.clone();
                write(&d.join("memory.max"), &limits.memory.to_string())?;
                let sw = d.join("memory.swap.max");
                if sw.exists() {
                    write(&sw, "0")?;
                }
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                if let Some(millis) = limits.cpu_millis {
                    write(&d.join("cpu.max"), &format!("{} 100000", millis * 100))?;
                }
            }
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a process writes its pid into to join.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves process `pid` (and its threads) in.
    pub fn add(&self, pid: i32) -> std::io::Result<()> {
        for f in self.procs() {
            std::fs::write(&f, pid.to_string())?;
        }
        Ok(())
    }

    /// Whether the kernel killed a process of this cgroup for going over its memory limit.
    pub fn oom_killed(&self) -> bool {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.memory.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
            })
            .is_some_and(|n| n > 0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in self.dirs.drain(..) {
            if std::fs::remove_dir(&d).is_err() && d.exists() {
                LEFTOVERS.lock().push(d);
            }
        }
    }
}

/// Removes the folders of servers that are gone (`dispatch-<pid>` with no such process) and
/// the empty cgroups left in them.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("dispatch-") else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(e.path()) {
            for c in children.flatten() {
                if c.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

/// Removes cgroups whose last process has exited since they were dropped.
fn retry_leftovers() {
    let mut l = LEFTOVERS.lock();
    l.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
}

pub use dispatch_core::quantity::human_bytes;
