//! Image builds on this host (DESIGN §3: base image + dependencies, content-addressed).
//!
//! An image with runtime dependencies is built once per digest into
//! `builds/images/<hex>/`: Python gets a virtual environment (`venv/`, `pip install
//! --no-input -r requirements.txt`), Node a `node_modules/` (`npm install --omit=dev`). A
//! build is trusted only when its `.complete` marker exists, and the marker is written last:
//! a build that failed or was cut short (crash, restart) is removed and redone, never used.
//! Builds of one digest are serialized (the second waits, then reuses the first's result);
//! builds of different digests run in parallel up to a limit. pip and npm run with the
//! server's environment (`PIP_INDEX_URL`, proxies, `npm_config_registry`, …) so that
//! mirrors and offline indexes work.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatch_core::Language;
use dispatch_core::digest::hex_part;
use tokio::sync::Semaphore;

use crate::backend::{BuildError, ImageBuild};

pub use crate::backend::Progress;

/// A dependency install that runs longer than this is stopped.
const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Lines of pip/npm output kept in an ERROR reason.
const REASON_LINES: usize = 8;

pub const COMPLETE_MARKER: &str = ".complete";

/// `python` arguments that run pip's install quietly (no prompts, no version nagging).
pub const PIP_INSTALL: [&str; 5] = [
    "-m",
    "pip",
    "install",
    "--no-input",
    "--disable-pip-version-check",
];

/// `npm` arguments that install a package.json's runtime dependencies, nothing else.
pub const NPM_INSTALL: [&str; 5] = [
    "install",
    "--omit=dev",
    "--no-audit",
    "--no-fund",
    "--no-package-lock",
];

pub struct ImageBuilder {
    dir: PathBuf,
    /// Digest → lock held while that digest builds. A std mutex: held only to get the entry.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    slots: Semaphore,
    installs: AtomicU64,
    /// Builds run sandboxed (DESIGN §9: network kept, only their own folder writable).
    sandboxes: parking_lot::RwLock<Option<Arc<crate::sandbox::Sandboxes>>>,
}

/// The identity image builds run as (one for all: a build runs no tenant's code, only the
/// packages its manifest names).
const BUILDS_IDENTITY: &str = "@image-builds";

impl ImageBuilder {
    pub fn new(dir: PathBuf, max_parallel: usize) -> ImageBuilder {
        ImageBuilder {
            dir,
            locks: Mutex::new(HashMap::new()),
            slots: Semaphore::new(max_parallel.max(1)),
            installs: AtomicU64::new(0),
            sandboxes: parking_lot::RwLock::new(None),
        }
    }

    pub fn set_sandboxes(&self, s: Option<Arc<crate::sandbox::Sandboxes>>) {
        *self.sandboxes.write() = s;
    }

    /// The sandbox of a build into `dir` (writable), if builds are sandboxed.
    fn jail(&self, dir: &Path) -> Result<Option<crate::sandbox::Jail>, BuildError> {
        let s = self.sandboxes.read().clone();
        let Some(s) = s else { return Ok(None) };
        let jail = s.jail(
            BUILDS_IDENTITY,
            Vec::new(),
            vec![(dir.to_path_buf(), dir.to_path_buf())],
            crate::sandbox::Limits::build(),
            true,
        );
        jail.hand_over(dir).map_err(|e| {
            BuildError::Io(format!("cannot hand {} to the build: {e}", dir.display()))
        })?;
        Ok(Some(jail))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the build of `digest` lives.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(hex_part(digest))
    }

    pub fn log_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.log", hex_part(digest)))
    }

    pub fn is_complete(&self, digest: &str) -> bool {
        self.path(digest).join(COMPLETE_MARKER).is_file()
    }

    /// Digests (hex) whose build holds its lock now.
    pub fn building(&self) -> std::collections::HashSet<String> {
        self.locks
            .lock()
            .iter()
            .filter(|(_, l)| l.try_lock().is_err())
            .map(|(d, _)| hex_part(d).to_string())
            .collect()
    }

    /// How many dependency installs ran (not reused); for tests and metrics.
    pub fn installs(&self) -> u64 {
        self.installs.load(Ordering::Relaxed)
    }

    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .entry(digest.to_string())
            .or_default()
            .clone()
    }

    /// Builds `digest` unless a complete build exists. `interpreter` is the base image's
    /// (Python: the one that creates the venv).
    pub async fn build(
        &self,
        digest: &str,
        build: &ImageBuild,
        manifest: &str,
        interpreter: Option<&Path>,
        progress: &Progress,
    ) -> Result<(), BuildError> {
        let lock = self.lock_for(digest);
        let _held = lock.lock().await;
        if self.is_complete(digest) {
            progress("reusing the existing build");
            return Ok(());
        }
        let _slot = match self.slots.try_acquire() {
            Ok(s) => s,
            Err(_) => {
                progress("waiting for a build slot");
                self.slots
                    .acquire()
                    .await
                    .map_err(|_| BuildError::Unsupported("the build queue was closed".into()))?
            }
        };
        let dir = self.path(digest);
        let log_path = self.log_path(digest);
        let res = self
            .install(&dir, &log_path, build, manifest, interpreter, progress)
            .await;
        if res.is_err() {
            // Never leave a half-built tree behind (the marker is absent anyway).
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        res
    }

    async fn install(
        &self,
        dir: &Path,
        log_path: &Path,
        build: &ImageBuild,
        manifest: &str,
        interpreter: Option<&Path>,
        progress: &Progress,
    ) -> Result<(), BuildError> {
        let io = |what: &str, e: std::io::Error| {
            BuildError::Io(format!("{what} {}: {e}", dir.display()))
        };
        if dir.exists() {
            progress("removing an unfinished build");
            tokio::fs::remove_dir_all(dir)
                .await
                .map_err(|e| io("failed to remove", e))?;
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io("failed to create", e))?;
        let mut log = Log::new(log_path);
        self.installs.fetch_add(1, Ordering::Relaxed);
        match build.base.language {
            Language::Python3 => {
                let python = interpreter.ok_or_else(|| BuildError::InterpreterMissing {
                    name: "python3".into(),
                })?;
                tokio::fs::write(dir.join("requirements.txt"), manifest)
                    .await
                    .map_err(|e| io("failed to write requirements.txt in", e))?;
                progress("creating the virtual environment");
                let venv = dir.join("venv");
                let jail = self.jail(dir)?;
                let step = |program: &Path, args: Vec<String>| {
                    let (mut cmd, cg) =
                        crate::worker::sandboxed(jail.as_ref(), program, &args, dir).map_err(
                            |e| BuildError::Io(format!("cannot start a build step: {e}")),
                        )?;
                    if jail.is_some() {
                        cmd.env("HOME", "/tmp");
                    }
                    Ok::<_, BuildError>((cmd, cg))
                };
                let (mut cmd, _cg) = step(
                    python,
                    vec!["-m".into(), "venv".into(), venv.display().to_string()],
                )?;
                run_step(&mut log, "venv", &mut cmd, dir).await?;
                progress("installing dependencies with pip");
                let mut args: Vec<String> = PIP_INSTALL.iter().map(|s| s.to_string()).collect();
                args.extend(["-r".into(), "requirements.txt".into()]);
                if let Some(url) = &build.index_url {
                    args.extend(["--index-url".into(), url.clone()]);
                }
                let (mut pip, _cg) = step(&venv.join("bin").join("python"), args)?;
                run_step(&mut log, "pip install", &mut pip, dir).await?;
            }
            Language::Nodejs => {
                tokio::fs::write(dir.join("package.json"), manifest)
                    .await
                    .map_err(|e| io("failed to write package.json in", e))?;
                progress("installing dependencies with npm");
                let npm = crate::host::find_program("npm")
                    .ok_or_else(|| BuildError::InterpreterMissing { name: "npm".into() })?;
                let mut args: Vec<String> = NPM_INSTALL.iter().map(|s| s.to_string()).collect();
                if let Some(url) = &build.index_url {
                    args.extend(["--registry".into(), url.clone()]);
                }
                let jail = self.jail(dir)?;
                let (mut cmd, _cg) = crate::worker::sandboxed(jail.as_ref(), &npm, &args, dir)
                    .map_err(|e| BuildError::Io(format!("cannot start npm: {e}")))?;
                if jail.is_some() {
                    cmd.env("HOME", "/tmp").env("npm_config_cache", "/tmp/.npm");
                }
                run_step(&mut log, "npm install", &mut cmd, dir).await?;
            }
            Language::Exec => {
                return Err(BuildError::Unsupported(
                    "exec images have no runtime dependencies to install".into(),
                ));
            }
        }
        log.flush();
        tokio::fs::write(dir.join(COMPLETE_MARKER), b"")
            .await
            .map_err(|e| io("failed to mark complete", e))?;
        progress("dependencies installed");
        Ok(())
    }

    /// The log of the last build of `digest`.
    pub fn log(&self, digest: &str) -> Option<String> {
        std::fs::read_to_string(self.log_path(digest)).ok()
    }
}

/// A build log: every step's command and output, written to `<hex>.log`.
struct Log {
    path: PathBuf,
    text: String,
}

impl Log {
    fn new(path: &Path) -> Log {
        Log {
            path: path.to_path_buf(),
            text: String::new(),
        }
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        if !s.ends_with('\n') {
            self.text.push('\n');
        }
        self.flush();
    }

    fn flush(&self) {
        if let Err(e) = std::fs::write(&self.path, &self.text) {
            tracing::warn!("failed to write build log {}: {e}", self.path.display());
        }
    }
}

/// Runs one build step with the server's environment, logging its output; a failure carries
/// the tool's last error lines.
async fn run_step(
    log: &mut Log,
    what: &str,
    cmd: &mut tokio::process::Command,
    dir: &Path,
) -> Result<(), BuildError> {
    log.push(&format!("$ {what}"));
    let (printed, result) = match run_tool(what, cmd, dir).await {
        Ok(o) => (o, Ok(())),
        Err((o, e)) => (o, Err(e)),
    };
    log.push(&printed.stdout);
    log.push(&printed.stderr);
    if let Err(BuildError::Step { detail, .. }) = &result
        && printed.stdout.is_empty()
        && printed.stderr.is_empty()
    {
        log.push(detail);
    }
    result
}

/// What a tool printed.
#[derive(Debug, Default)]
pub struct ToolOutput {
    pub stdout: String,
    pub stderr: String,
}

/// Runs a build tool (pip, npm) in `dir` with a time limit. A failure is a
/// [`BuildError::Step`] naming the step with the tool's last error lines (pip and npm put the
/// useful part on stderr), next to everything it printed.
pub async fn run_tool(
    what: &str,
    cmd: &mut tokio::process::Command,
    dir: &Path,
) -> Result<ToolOutput, (ToolOutput, BuildError)> {
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let fail = |printed: ToolOutput, detail: String| {
        let e = BuildError::Step {
            step: what.to_string(),
            detail,
        };
        Err((printed, e))
    };
    let out = match tokio::time::timeout(BUILD_TIMEOUT, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return fail(ToolOutput::default(), format!("failed to start: {e}")),
        Err(_) => {
            return fail(
                ToolOutput::default(),
                format!("did not finish within {BUILD_TIMEOUT:?}"),
            );
        }
    };
    let printed = ToolOutput {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if out.status.success() {
        return Ok(printed);
    }
    let source = if printed.stderr.trim().is_empty() {
        &printed.stdout
    } else {
        &printed.stderr
    };
    let lines: Vec<&str> = source
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("npm warn"))
        .collect();
    let tail = lines[lines.len().saturating_sub(REASON_LINES)..].join("\n");
    let detail = format!("exited with {}: {tail}", out.status);
    fail(printed, detail)
}
