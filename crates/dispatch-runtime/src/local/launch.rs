//! How a function's workers start on this machine: the launcher (a fork from the image's
//! Python zygote, a Node spare, or a plain spawn) and the worker spec (interpreter, sandbox,
//! environment, limits) it starts them with.

use super::*;

impl LocalBackend {
    /// How a pool of `d` gets new workers: a zygote's fork (Python), a spare generic worker
    /// (Node), or a spawn.
    pub(super) fn launcher(&self, d: &FunctionDeploy, spec: &WorkerSpec) -> Launcher {
        if !self.fast_start.load(Ordering::Relaxed) {
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
        })
    }
}
