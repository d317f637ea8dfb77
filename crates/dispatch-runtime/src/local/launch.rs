//! How a function's workers start on this machine: the launcher (a fork from the image's
//! Python zygote, a Node spare, or a plain spawn) and the worker spec (interpreter, sandbox,
//! environment, limits) it starts them with.

use super::*;

/// The paths of a function's Kubernetes image (crates/dispatch-k8s/src/image.rs), where the
/// container tier shows the same files.
pub const CONTAINER_RUNNER: &str = "/dispatch/bin/dispatch";
pub const CONTAINER_RUNTIMES_DIR: &str = "/dispatch/runtimes";
pub const CONTAINER_FUNCTION_DIR: &str = "/function";

/// A step of `d`'s deploy (a pull, an install): in the server's log and its CREATING reason.
fn tell(d: &FunctionDeploy, line: &str) {
    tracing::info!(function = %format!("{}/{}", d.namespace, d.name), "{line}");
    d.steps.say(line);
}

impl LocalBackend {
    /// A retired pool serving again: its function's own (sandboxed) zygote or spares are the
    /// function's again; shared ones (by interpreter) stay where they are.
    pub(super) fn restore_launcher(&self, key: &(String, String), pool: &crate::pool::Pool) {
        match pool.launcher() {
            Launcher::Zygote(z) if !self.zygotes.lock().values().any(|s| Arc::ptr_eq(s, z)) => {
                self.function_zygotes.lock().insert(key.clone(), z.clone());
            }
            Launcher::Spares(sp) if !self.spares.lock().values().any(|s| Arc::ptr_eq(s, sp)) => {
                self.function_spares.lock().insert(key.clone(), sp.clone());
            }
            _ => {}
        }
    }

    /// How a pool of `d` gets new workers: a zygote's fork (Python), a spare generic worker
    /// (Node), or a spawn.
    pub(super) fn launcher(&self, d: &FunctionDeploy, spec: &WorkerSpec) -> Launcher {
        // A container per worker: no zygote or spare crosses into one.
        if !self.fast_start.load(Ordering::Relaxed) || spec.container.is_some() {
            return Launcher::Spawn;
        }
        if let Some(jail) = &spec.jail {
            // One sandbox per function: its zygote (or its spare Node worker) sees only that
            // function's code.
            if d.base.language == Language::Nodejs {
                let node_path = spec.env.get("NODE_PATH").cloned();
                let s = Arc::new(
                    Spares::new(
                        spec.program.clone(),
                        self.runtimes_dir.join("bootstrap.js"),
                        node_path
                            .map(|p| BTreeMap::from([("NODE_PATH".to_string(), p)]))
                            .unwrap_or_default(),
                        1,
                        format!("spare {}/{}", d.namespace, d.name),
                    )
                    .in_jail(Some(jail.clone())),
                );
                let old = self
                    .function_spares
                    .lock()
                    .insert((d.namespace.clone(), d.name.clone()), s.clone());
                if let Some(old) = old {
                    old.stop();
                }
                return Launcher::Spares(s);
            }
            if d.base.language != Language::Python3
                || d.env
                    .keys()
                    .any(|k| k.starts_with("PYTHON") && k != "PYTHONPATH")
            {
                return Launcher::Spawn;
            }
            let z = Arc::new(
                Zygote::new(
                    spec.program.clone(),
                    self.runtimes_dir.join("bootstrap.py"),
                    d.preload.clone(),
                    format!("zygote {}/{}", d.namespace, d.name),
                )
                .in_jail(Some(jail.clone())),
            );
            self.function_zygotes
                .lock()
                .insert((d.namespace.clone(), d.name.clone()), z.clone());
            return Launcher::Zygote(z);
        }
        match d.base.language {
            // Interpreter settings in the declared environment (PYTHONHASHSEED, …) act at
            // interpreter start, which a fork skips: such functions get their own process.
            Language::Python3
                if !d
                    .env
                    .keys()
                    .any(|k| k.starts_with("PYTHON") && k != "PYTHONPATH") =>
            {
                let key = (spec.program.clone(), d.preload.clone());
                let z = self
                    .zygotes
                    .lock()
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(Zygote::new(
                            spec.program.clone(),
                            self.runtimes_dir.join("bootstrap.py"),
                            d.preload.clone(),
                            format!("zygote {}", spec.program.display()),
                        ))
                    })
                    .clone();
                Launcher::Zygote(z)
            }
            Language::Nodejs => {
                let node_path = spec.env.get("NODE_PATH").cloned();
                let key = (spec.program.clone(), node_path.clone());
                let s = self
                    .spares
                    .lock()
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(Spares::new(
                            spec.program.clone(),
                            self.runtimes_dir.join("bootstrap.js"),
                            node_path
                                .map(|p| BTreeMap::from([("NODE_PATH".to_string(), p)]))
                                .unwrap_or_default(),
                            1,
                            format!("spare {}", spec.program.display()),
                        ))
                    })
                    .clone();
                Launcher::Spares(s)
            }
            _ => Launcher::Spawn,
        }
    }

    pub(super) fn interpreter(base: &BaseImageCheck) -> Result<Option<PathBuf>, BuildError> {
        let name = match (&base.interpreter, base.language.default_interpreter()) {
            (Some(i), _) => i.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => return Ok(None),
        };
        crate::host::find_program(&name)
            .map(Some)
            .ok_or(BuildError::InterpreterMissing { name })
    }

    /// The spec of a function's workers in containers (the container tier): its base image
    /// pulled, its code, the bootstraps and this binary shown read-only at the paths of the
    /// Kubernetes image, `dispatch runner --worker` as the process.
    pub(super) async fn container_spec(
        &self,
        d: &FunctionDeploy,
        dir: PathBuf,
        handler: &str,
    ) -> Result<WorkerSpec, BuildError> {
        let unsupported = |m: String| Err(BuildError::Unsupported(m));
        let Some(tier) = self.containers() else {
            return unsupported(
                "spec.isolation: container needs an OCI runtime on this server: install runc (Debian: apt-get install runc) and restart it, or drop spec.isolation".into(),
            );
        };
        if d.base.image.is_empty() {
            return unsupported("its base image names no OCI image to run".into());
        }
        let policy = crate::container::PullPolicy::of(None, &d.base.image)
            .map_err(BuildError::Unsupported)?;
        let note = |line: String| tell(d, &line);
        let image = tier
            .images
            .ensure(&d.base.image, policy, &note)
            .await
            .map_err(|e| BuildError::Step {
                step: format!("pulling base image {}", d.base.image),
                detail: e.to_string(),
            })?;
        // The runner is this (glibc) binary: an image without glibc's loader cannot start it.
        let loader = match std::env::consts::ARCH {
            "aarch64" => "lib/ld-linux-aarch64.so.1",
            _ => "lib64/ld-linux-x86-64.so.2",
        };
        let found = crate::container::unpack::resolve_in(&image.rootfs, Path::new(loader), true)
            .is_ok_and(|p| p.exists());
        if !found {
            return unsupported(format!(
                "base image {} has no glibc (/{loader}): the runner that starts its workers is this dispatch binary, which needs a glibc-based image (e.g. python:3-slim or node:22-slim, not an -alpine one)",
                d.base.image
            ));
        }
        let runner = std::env::current_exe()
            .map_err(|e| BuildError::Io(format!("cannot find this binary (the runner): {e}")))?;
        let deps = self.container_dependencies(d, &tier).await?;
        let (uid, gid) = crate::container::identity(self.sandboxes().as_deref(), &d.namespace);
        let mut env: Vec<(String, String)> = [
            ("LANG", "C.UTF-8"),
            ("HOME", "/tmp"),
            ("PYTHONUNBUFFERED", "1"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(d.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // What the Kubernetes image's config sets (crates/dispatch-k8s/src/image.rs).
        env.extend([
            ("DISPATCH_LANGUAGE".to_string(), d.base.language.to_string()),
            ("DISPATCH_HANDLER".to_string(), handler.to_string()),
            (
                "DISPATCH_FUNCTION_DIR".to_string(),
                CONTAINER_FUNCTION_DIR.to_string(),
            ),
            (
                "DISPATCH_RUNTIMES_DIR".to_string(),
                CONTAINER_RUNTIMES_DIR.to_string(),
            ),
            (
                "DISPATCH_PROTOCOL_FD".to_string(),
                crate::container::engine::PROTOCOL_FD.to_string(),
            ),
        ]);
        if let Some(i) = &d.base.interpreter {
            env.push(("DISPATCH_INTERPRETER".to_string(), i.clone()));
        }
        let mut binds = vec![
            (runner.clone(), CONTAINER_RUNNER.to_string()),
            (
                self.runtimes_dir.clone(),
                CONTAINER_RUNTIMES_DIR.to_string(),
            ),
            (dir, CONTAINER_FUNCTION_DIR.to_string()),
        ];
        if let Some((host, var, inside)) = deps {
            env.push((var.to_string(), inside.to_string()));
            binds.push((host, inside.to_string()));
        }
        let template = crate::container::Container {
            rootfs: image.rootfs.clone(),
            image: image.config.clone(),
            command: vec![
                CONTAINER_RUNNER.to_string(),
                "runner".into(),
                "--worker".into(),
            ],
            args: Vec::new(),
            env,
            working_dir: Some(CONTAINER_FUNCTION_DIR.to_string()),
            uid,
            gid,
            limits: crate::sandbox::Limits {
                memory: d.limits.memory,
                pids: u64::from(d.limits.pids),
                cpu_millis: d.limits.cpu_millis,
                tmp: d.limits.tmp,
            },
            network: d.network,
            hostname: d.name.clone(),
            binds,
        };
        Ok(WorkerSpec {
            program: runner,
            prefix_args: Vec::new(),
            dir: PathBuf::from(CONTAINER_FUNCTION_DIR),
            handler_args: Vec::new(),
            env: BTreeMap::new(),
            label: format!("{}/{}", d.namespace, d.name),
            jail: None,
            max_output_bytes: usize::try_from(d.limits.max_output_bytes).unwrap_or(usize::MAX),
            stream_stdout: d.stream,
            container: Some(Arc::new(crate::worker::ContainerWorker {
                engine: tier.engine.clone(),
                image: Arc::new(image),
                template,
                prefix: format!("fn-{}-{}", d.namespace, d.name),
            })),
        })
    }

    /// The image's dependencies installed for the function's *base image* (its Python version
    /// and platform, as the Kubernetes image gets them: `oci::function::dependencies_layer`),
    /// unpacked once per image under its build folder (`container-deps/`, collected with it);
    /// the host folder, the variable and the path inside. `None` without dependencies.
    async fn container_dependencies(
        &self,
        d: &FunctionDeploy,
        tier: &crate::container::Containers,
    ) -> Result<Option<(PathBuf, &'static str, &'static str)>, BuildError> {
        let (Some(image), Some(manifest)) = (&d.image_build, d.dependencies.as_deref()) else {
            return Ok(None);
        };
        let (var, inside) = match d.base.language {
            Language::Python3 => ("PYTHONPATH", crate::oci::function::PYTHON_DEPS_DIR),
            Language::Nodejs => ("NODE_PATH", crate::oci::function::NODE_DEPS_DIR),
            Language::Exec => return Ok(None),
        };
        let dir = self.images.path(image).join("container-deps");
        let host = dir.join(inside.trim_start_matches('/'));
        if dir.join(".complete").exists() {
            return Ok(Some((host, var, inside)));
        }
        let step = |what: &str| {
            let what = what.to_string();
            move |e: String| BuildError::Step {
                step: what,
                detail: e,
            }
        };
        let base = tier
            .images
            .base(&d.base.image)
            .await
            .map_err(|e| step("reading the base image")(e.to_string()))?;
        let progress = |line: &str| tell(d, line);
        let layer = crate::oci::function::dependencies_layer(
            &base,
            d.base.language,
            Some(manifest),
            None,
            d.index_url.as_deref(),
            &progress,
        )
        .await
        .map_err(|e| step("installing dependencies for the base image")(e.to_string()))?;
        let Some((layer, _)) = layer else {
            return Ok(None);
        };
        let owners = nix::unistd::geteuid().is_root();
        let unpacked = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            crate::container::unpack::apply_layer(
                &tmp,
                flate2::read::GzDecoder::new(&layer.data[..]),
                owners,
            )?;
            std::fs::write(tmp.join(".complete"), "")?;
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                // Another deploy of this image finished first.
                std::fs::remove_dir_all(&tmp)?;
                if !dir.join(".complete").exists() {
                    return Err(e);
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| BuildError::Io(e.to_string()))?;
        unpacked.map_err(|e| step("unpacking the dependencies")(e.to_string()))?;
        Ok(Some((host, var, inside)))
    }

    /// The program and arguments of a worker of `d` whose code is in `dir` (`dispatch runner
    /// --worker` execs them).
    pub fn worker_command(
        &self,
        d: &FunctionDeploy,
        dir: PathBuf,
    ) -> Result<(PathBuf, Vec<String>), BuildError> {
        let files = super::list_files(&dir)
            .map_err(|e| BuildError::Io(format!("cannot read {}: {e}", dir.display())))?;
        let resolved = handler::resolve(d.base.language, d.handler.as_deref(), &files)?;
        let spec = self.worker_spec(d, dir, resolved.args)?;
        let mut args = spec.prefix_args.clone();
        if d.base.language != Language::Exec {
            args.push(spec.dir.display().to_string());
        }
        args.extend(spec.handler_args.iter().cloned());
        Ok((spec.program, args))
    }

    pub(super) fn worker_spec(
        &self,
        d: &FunctionDeploy,
        dir: PathBuf,
        args: Vec<String>,
    ) -> Result<WorkerSpec, BuildError> {
        let label = format!("{}/{}", d.namespace, d.name);
        let mut env = d.env.clone();
        let deps = match &d.image_build {
            Some(digest) if self.images.is_complete(digest) => Some(self.images.path(digest)),
            Some(digest) => {
                return Err(BuildError::Unsupported(format!(
                    "the dependency build {digest} of this function's image is missing: rebuild the image"
                )));
            }
            None => None,
        };
        let (program, prefix_args) = match d.base.language {
            Language::Python3 => (
                match &deps {
                    // The image's virtual environment has the dependencies.
                    Some(dir) => dir.join("venv").join("bin").join("python"),
                    None => Self::interpreter(&d.base)?.unwrap_or_default(),
                },
                vec![
                    "-u".into(),
                    self.runtimes_dir.join("bootstrap.py").display().to_string(),
                ],
            ),
            Language::Nodejs => (
                {
                    if let Some(dir) = &deps {
                        // CommonJS `require` also searches NODE_PATH.
                        env.insert(
                            "NODE_PATH".into(),
                            dir.join("node_modules").display().to_string(),
                        );
                    }
                    Self::interpreter(&d.base)?.unwrap_or_default()
                },
                vec![self.runtimes_dir.join("bootstrap.js").display().to_string()],
            ),
            Language::Exec => (dir.join(&args[0]), Vec::new()),
        };
        let handler_args = if d.base.language == Language::Exec {
            Vec::new()
        } else {
            args
        };
        let jail = self.sandboxes().map(|s| {
            // What the function's processes see: its own code, the bootstraps, its image's
            // dependencies; nothing else of the data dir.
            let mut ro = vec![dir.clone(), self.runtimes_dir.clone()];
            ro.extend(deps.clone());
            Arc::new(s.jail(
                &d.namespace,
                ro,
                Vec::new(),
                crate::sandbox::Limits {
                    memory: d.limits.memory,
                    pids: u64::from(d.limits.pids),
                    cpu_millis: d.limits.cpu_millis,
                    tmp: d.limits.tmp,
                },
                d.network,
            ))
        });
        Ok(WorkerSpec {
            program,
            prefix_args,
            dir,
            handler_args,
            env,
            label,
            jail,
            max_output_bytes: usize::try_from(d.limits.max_output_bytes).unwrap_or(usize::MAX),
            stream_stdout: d.stream,
            container: None,
        })
    }
}
