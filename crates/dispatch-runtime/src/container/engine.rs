//! The OCI runtime (`runc`, or `crun` where it works) driven as a subprocess (DESIGN §11:
//! libcontainer is not safe inside a multi-threaded tokio process), and the bundle each
//! container starts from, written with oci-spec: the image's root file system read-only, a
//! size-capped writable `/tmp`, the namespace's identity, no capabilities, `no_new_privs`, the
//! sandbox's seccomp deny list, cgroup limits, and its own PID, IPC, UTS and mount namespaces.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use oci_spec::runtime::{
    Arch, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccompAction,
    LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall,
    LinuxSyscallBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder, get_default_mounts, get_default_namespaces,
};

use super::images::ImageConfig;
use crate::sandbox::Limits;

/// Where the OCI runtime keeps its containers' state (`--root`), under the data dir.
const STATE_DIR: &str = "containers/state";
const BUNDLES_DIR: &str = "containers/bundles";

/// The OCI runtime of this server.
#[derive(Debug, Clone)]
pub struct Engine {
    pub program: PathBuf,
    /// `runc` or `crun`.
    pub name: String,
    pub version: String,
    state: PathBuf,
    bundles: PathBuf,
}

fn version_of(program: &Path) -> Option<String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Cgroups v1 and v2 mounted side by side ("hybrid"): crun 1.8 refuses it, runc works.
fn hybrid_cgroups() -> bool {
    Path::new("/sys/fs/cgroup/unified").is_dir() && Path::new("/sys/fs/cgroup/memory").is_dir()
}

impl Engine {
    /// `explicit` (`--oci-runtime`), else crun where it works, else runc. Fails with what to
    /// install when there is none.
    pub fn detect(explicit: Option<&Path>, data_dir: &Path) -> Result<Engine, String> {
        let program = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let crun = on_path("crun").filter(|_| !hybrid_cgroups());
                crun.or_else(|| on_path("runc")).ok_or_else(|| {
                    "no OCI runtime found: install runc (Debian: apt-get install runc) or crun \
                     (crun refuses this machine's hybrid cgroups when there are both v1 and v2)"
                        .to_string()
                })?
            }
        };
        let version = version_of(&program)
            .ok_or_else(|| format!("{} does not run (--version failed)", program.display()))?;
        if !nix::unistd::geteuid().is_root() {
            return Err(
                "the container tier needs the server to run as root (rootless OCI runtimes are not supported yet)"
                    .into(),
            );
        }
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let engine = Engine {
            program,
            name,
            version,
            state: data_dir.join(STATE_DIR),
            bundles: data_dir.join(BUNDLES_DIR),
        };
        std::fs::create_dir_all(&engine.state).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&engine.bundles).map_err(|e| e.to_string())?;
        Ok(engine)
    }

    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.program);
        c.arg("--root").arg(&self.state);
        c.stdin(Stdio::null());
        c
    }

    /// Deletes the containers a previous run of this server left (it died with them running).
    pub fn reap_all(&self) {
        let Ok(entries) = std::fs::read_dir(&self.state) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            self.delete(&id);
        }
        if let Ok(entries) = std::fs::read_dir(&self.bundles) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Kills and removes container `id` (nothing when it is gone already).
    pub fn delete(&self, id: &str) {
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.bundles.join(id));
    }

    /// Writes the bundle of `id` and returns the command that runs it in the foreground (its
    /// exit status is the container's). With `protocol_fd`, the command's stdin (a worker's
    /// protocol socket) reaches the container as fd 3 ([`PROTOCOL_FD`]): the OCI runtime pipes
    /// stdio, so the socket goes through `--preserve-fds`, moved to fd 3 by this binary's
    /// `container-exec` step ([`exec_main`]) just before it execs the runtime.
    pub fn prepare(
        &self,
        id: &str,
        c: &Container,
        protocol_fd: bool,
    ) -> Result<tokio::process::Command, String> {
        let spec = c.spec()?;
        let dir = self.bundles.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("bundle: {e}"))?;
        spec.save(dir.join("config.json"))
            .map_err(|e| format!("bundle: {e}"))?;
        let mut cmd = if protocol_fd {
            let me =
                std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
            let mut cmd = tokio::process::Command::new(me);
            cmd.arg(EXEC_STEP).arg(&self.program);
            cmd
        } else {
            tokio::process::Command::new(&self.program)
        };
        cmd.arg("--root").arg(&self.state).arg("run");
        if protocol_fd {
            cmd.args(["--preserve-fds", "1"]);
        }
        cmd.arg("--bundle").arg(&dir).arg(id);
        Ok(cmd)
    }
}

/// The fd a container worker's protocol socket has inside (`DISPATCH_PROTOCOL_FD`).
pub const PROTOCOL_FD: i32 = 3;
/// The first argument of `dispatch` that runs [`exec_main`].
pub const EXEC_STEP: &str = "container-exec";

/// `dispatch container-exec RUNTIME ARGS…` (hidden; run first thing in `main`, before any
/// thread or fd exists): stdin (a protocol socket) is duplicated to fd 3 — the lowest free fd
/// at or above 3 in a fresh process, checked — stdin becomes `/dev/null`, then the OCI runtime
/// is executed with `--preserve-fds 1` among `ARGS`. Safe code only (`F_DUPFD`, `dup2`).
pub fn exec_main(args: Vec<std::ffi::OsString>) -> ! {
    use std::os::unix::process::CommandExt as _;
    let fail = |why: String| -> ! {
        eprintln!("dispatch container-exec: {why}");
        std::process::exit(125);
    };
    let Some((program, rest)) = args.split_first() else {
        fail("usage: dispatch container-exec RUNTIME ARGS…".into());
    };
    match nix::fcntl::fcntl(std::io::stdin(), nix::fcntl::FcntlArg::F_DUPFD(PROTOCOL_FD)) {
        Ok(fd) if fd == PROTOCOL_FD => {}
        Ok(fd) => fail(format!(
            "fd {PROTOCOL_FD} is taken (the socket went to fd {fd})"
        )),
        Err(e) => fail(format!("cannot duplicate stdin: {e}")),
    }
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdin(null) {
                fail(format!("cannot replace stdin: {e}"));
            }
        }
        Err(e) => fail(format!("cannot open /dev/null: {e}")),
    }
    let err = std::process::Command::new(program).args(rest).exec();
    fail(format!("cannot run {}: {err}", program.to_string_lossy()));
}

/// A container started from a bundle: deleted (killed first) when dropped — a cancel, a
/// deadline, a worker let go, or its end.
pub struct Running {
    engine: std::sync::Arc<Engine>,
    id: String,
}

static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Running {
    /// Writes the bundle of a new container (`prefix-N`) and returns the command that runs it
    /// in the foreground (its exit status is the container's) and its guard.
    pub fn prepare(
        engine: &std::sync::Arc<Engine>,
        prefix: &str,
        c: &Container,
        protocol_fd: bool,
    ) -> Result<(tokio::process::Command, Running), String> {
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{prefix}-{n}");
        let cmd = engine.prepare(&id, c, protocol_fd)?;
        Ok((
            cmd,
            Running {
                engine: engine.clone(),
                id,
            },
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let (engine, id) = (self.engine.clone(), std::mem::take(&mut self.id));
        // `runc delete` waits for the kill: not on a runtime thread.
        std::thread::spawn(move || engine.delete(&id));
    }
}

/// One container to run: an unpacked image and what the job's spec says.
#[derive(Debug, Clone)]
pub struct Container {
    pub rootfs: PathBuf,
    pub image: ImageConfig,
    /// Kubernetes' `command` (replaces the image's entrypoint) and `args` (its cmd).
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
    /// The host's network (as sandboxed job commands have); else only loopback.
    pub network: bool,
    pub hostname: String,
    /// Host paths shown read-only inside (`(host, inside)`): a function's code and runner.
    pub binds: Vec<(PathBuf, String)>,
}

/// Kubernetes' rule: `command` replaces the entrypoint (and drops cmd), `args` replaces cmd.
pub fn argv(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    let (head, tail) = if command.is_empty() {
        (
            image.entrypoint.clone(),
            if args.is_empty() { &image.cmd } else { args },
        )
    } else {
        (command.to_vec(), args)
    };
    head.into_iter().chain(tail.iter().cloned()).collect()
}

/// A read-only bind mount of `host` at `inside` (no setuid, no devices).
fn read_only_bind(host: &Path, inside: &Path) -> Result<Mount, oci_spec::OciSpecError> {
    MountBuilder::default()
        .destination(inside)
        .typ("bind")
        .source(host)
        .options(
            ["rbind", "ro", "nosuid", "nodev"]
                .map(String::from)
                .to_vec(),
        )
        .build()
}

/// The sandbox's deny list as OCI seccomp rules (the same calls, the same errors).
fn seccomp_rules() -> Result<Vec<LinuxSyscall>, String> {
    let e = |e: oci_spec::OciSpecError| e.to_string();
    let mut rules = vec![
        LinuxSyscallBuilder::default()
            .names(
                crate::sandbox::walls::denied_calls()
                    .into_iter()
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::EPERM as u32)
            .build()
            .map_err(e)?,
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::ENOSYS as u32)
            .build()
            .map_err(e)?,
    ];
    for flag in crate::sandbox::walls::NAMESPACE_FLAGS {
        let f = flag as u64;
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(libc::EPERM as u32)
                .args(vec![
                    LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(f)
                        .value_two(f)
                        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                        .build()
                        .map_err(e)?,
                ])
                .build()
                .map_err(e)?,
        );
    }
    Ok(rules)
}

impl Container {
    /// The OCI runtime spec (`config.json`) of this container.
    pub fn spec(&self) -> Result<Spec, String> {
        let e = |e: oci_spec::OciSpecError| e.to_string();
        let args = argv(&self.image, &self.command, &self.args);
        if args.is_empty() {
            return Err("the image has no entrypoint or cmd and the container no command".into());
        }
        // The image's environment, a PATH when it has none, then the spec's variables.
        let mut env: Vec<String> = self.image.env.clone();
        if !env.iter().any(|v| v.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        for (k, v) in &self.env {
            let prefix = format!("{k}=");
            env.retain(|x| !x.starts_with(&prefix));
            env.push(format!("{k}={v}"));
        }
        let cwd = self
            .working_dir
            .clone()
            .or_else(|| self.image.working_dir.clone())
            .unwrap_or_else(|| "/".into());
        let none: HashSet<oci_spec::runtime::Capability> = HashSet::new();
        let process = ProcessBuilder::default()
            .terminal(false)
            .user(
                UserBuilder::default()
                    .uid(self.uid)
                    .gid(self.gid)
                    .build()
                    .map_err(e)?,
            )
            .args(args)
            .env(env)
            .cwd(cwd)
            .no_new_privileges(true)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(none.clone())
                    .effective(none.clone())
                    .inheritable(none.clone())
                    .permitted(none.clone())
                    .ambient(none)
                    .build()
                    .map_err(e)?,
            )
            .build()
            .map_err(e)?;
        let mut mounts = get_default_mounts();
        mounts.push(
            MountBuilder::default()
                .destination("/tmp")
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec![
                    "nosuid".into(),
                    "nodev".into(),
                    "mode=1777".into(),
                    format!("size={}", self.limits.tmp),
                ])
                .build()
                .map_err(e)?,
        );
        for (host, inside) in &self.binds {
            mounts.push(read_only_bind(host, Path::new(inside)).map_err(e)?);
        }
        if self.network {
            // The host's name resolution, read-only (as container engines do).
            for f in ["/etc/resolv.conf", "/etc/hosts"] {
                if Path::new(f).is_file() {
                    mounts.push(read_only_bind(Path::new(f), Path::new(f)).map_err(e)?);
                }
            }
        }
        let mut namespaces = get_default_namespaces();
        if self.network {
            namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
        let mut resources = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(self.limits.memory as i64)
                    // No swap beyond the limit: a container over it is killed, not slowed.
                    .swap(self.limits.memory as i64)
                    .build()
                    .map_err(e)?,
            )
            .pids(
                LinuxPidsBuilder::default()
                    .limit(self.limits.pids as i64)
                    .build()
                    .map_err(e)?,
            );
        if let Some(m) = self.limits.cpu_millis {
            let period = 100_000u64;
            resources = resources.cpu(
                LinuxCpuBuilder::default()
                    .period(period)
                    .quota((m * period / 1000).max(1000) as i64)
                    .build()
                    .map_err(e)?,
            );
        }
        let arch = match std::env::consts::ARCH {
            "aarch64" => Arch::ScmpArchAarch64,
            _ => Arch::ScmpArchX86_64,
        };
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources.build().map_err(e)?)
            .seccomp(
                LinuxSeccompBuilder::default()
                    .default_action(LinuxSeccompAction::ScmpActAllow)
                    .architectures(vec![arch])
                    .syscalls(seccomp_rules()?)
                    .build()
                    .map_err(e)?,
            )
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
            .build()
            .map_err(e)?;
        SpecBuilder::default()
            .version("1.0.2")
            .hostname(self.hostname.clone())
            .root(
                RootBuilder::default()
                    .path(self.rootfs.clone())
                    .readonly(true)
                    .build()
                    .map_err(e)?,
            )
            .process(process)
            .mounts(mounts)
            .linux(linux)
            .build()
            .map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "A=image".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            working_dir: Some("/work".into()),
        }
    }

    #[test]
    fn command_and_args_follow_kubernetes() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(argv(&image(), &[], &[]), s(&["/entry", "default"]));
        assert_eq!(argv(&image(), &[], &s(&["x"])), s(&["/entry", "x"]));
        assert_eq!(argv(&image(), &s(&["sh"]), &[]), s(&["sh"]));
        assert_eq!(
            argv(&image(), &s(&["sh"]), &s(&["-c", "x"])),
            s(&["sh", "-c", "x"])
        );
    }

    #[test]
    fn the_bundle_is_read_only_unprivileged_and_limited() {
        let c = Container {
            rootfs: "/images/rootfs/abc".into(),
            image: image(),
            command: vec![],
            args: vec![],
            env: vec![("A".into(), "spec".into())],
            working_dir: None,
            uid: 2_000_000_001,
            gid: 2_000_000_001,
            limits: Limits::job(),
            network: false,
            hostname: "job".into(),
            binds: vec![("/srv/fn".into(), "/function".into())],
        };
        let v = serde_json::to_value(c.spec().unwrap()).unwrap();
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["user"]["uid"], 2_000_000_001u32);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(
            v["process"]["capabilities"]["bounding"],
            serde_json::json!([])
        );
        assert_eq!(v["process"]["cwd"], "/work");
        let env = v["process"]["env"].as_array().unwrap();
        assert!(env.contains(&"A=spec".into()) && !env.contains(&"A=image".into()));
        assert_eq!(
            v["linux"]["resources"]["memory"]["limit"],
            1024 * 1024 * 1024i64
        );
        let ns: Vec<_> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap().to_string())
            .collect();
        assert!(ns.contains(&"network".to_string()) && ns.contains(&"pid".to_string()));
        let mount = |at: &str| {
            let all = v["mounts"].as_array().unwrap();
            all.iter().find(|m| m["destination"] == at).unwrap().clone()
        };
        let tmp = mount("/tmp");
        assert!(
            tmp["options"]
                .as_array()
                .unwrap()
                .contains(&"size=268435456".into())
        );
        let bind = mount("/function");
        assert_eq!(bind["source"], "/srv/fn");
        assert!(bind["options"].as_array().unwrap().contains(&"ro".into()));
        let denied = v["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap();
        assert!(denied.contains(&"mount".into()) && denied.contains(&"ptrace".into()));
    }
}
