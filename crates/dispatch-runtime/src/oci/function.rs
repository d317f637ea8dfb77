//! Function images (for Kubernetes; the container tier shows the same paths and installs the
//! same dependencies layer): the function's base image (a language runtime
//! from any registry) plus four layers, pushed to the cluster's registry under the function's
//! content digest:
//!
//! | layer | path | shared by |
//! |---|---|---|
//! | runner | `/dispatch/bin/dispatch` (this binary; entrypoint `dispatch runner`) | every function |
//! | bootstrap | `/dispatch/runtimes/bootstrap.{py,js}` | every function of the language |
//! | dependencies | `/dispatch/deps/python` (PYTHONPATH) or `/dispatch/deps/node_modules` (NODE_PATH) | functions with the same requirements |
//! | source | `/function` | this function |
//!
//! Dependencies are installed here for the *target* platform, not this machine's: pip with
//! `--target --platform manylinux2014_<arch> --only-binary=:all: --python-version X.Y` (wheels
//! only: nothing is compiled), npm with `--ignore-scripts` (pure JavaScript packages; a package
//! that needs a native build is refused with its name).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use dispatch_core::Language;

use super::{BaseImage, ConfigChanges, ImagePlan, Layer, LayerBuilder, OciError, Pushed, Registry};
use crate::backend::BuildError;
use crate::build::run_tool;
use crate::host::find_program;
use crate::local::bootstrap;

pub const RUNNER_PATH: &str = "/dispatch/bin/dispatch";
pub const RUNTIMES_DIR: &str = "/dispatch/runtimes";
pub const FUNCTION_DIR: &str = "/function";
pub const PYTHON_DEPS_DIR: &str = "/dispatch/deps/python";
pub const NODE_DEPS_DIR: &str = "/dispatch/deps/node_modules";
/// The port `dispatch runner` listens on in a function's container.
pub const PORT: u16 = 8080;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{0}")]
    Invalid(String),
}

/// A function to turn into an image.
pub struct ImageRequest {
    pub name: String,
    pub language: Language,
    /// As in the function's spec (`None`: the default for the source).
    pub handler: Option<String>,
    /// The function's source archive (tar.gz, as uploaded).
    pub archive: Arc<Vec<u8>>,
    /// The language runtime to build on (`python:3.11-slim`, `node:20-slim`, …).
    pub base: String,
    /// Where to push: `registry/path`; the image is `<repository>/<name>:<tag>`.
    pub repository: String,
    /// The function's content digest (`sha256:…`); its hex is the tag.
    pub digest: String,
    /// requirements.txt or package.json.
    pub dependencies: Option<String>,
    /// Python `X.Y` of the base; default: its `PYTHON_VERSION` variable.
    pub python_version: Option<String>,
    /// Package index (pip `--index-url`, npm `--registry`).
    pub index_url: Option<String>,
    /// The `dispatch` binary to put in the image as its runner.
    pub runner: PathBuf,
}

/// The image reference a function is pushed to, by tag.
pub fn target(repository: &str, name: &str, digest: &str) -> String {
    let hex = dispatch_core::digest::hex_part(digest);
    format!("{}/{name}:{hex}", repository.trim_end_matches('/'))
}

/// A function image in the registry.
#[derive(Debug, Clone)]
pub struct Built {
    pub pushed: Pushed,
    /// The handler as resolved against the source (the default filled in).
    pub handler: String,
}

/// Builds the function's image and pushes what the registry lacks.
pub async fn build(
    registry: &Registry,
    f: &ImageRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Built, ImageError> {
    progress(&format!("reading base image {}", f.base));
    let base = registry.base(&f.base).await?;

    // The source first: a bad archive or handler fails before anything is installed.
    let src = tempfile::tempdir().map_err(io("a temporary folder"))?;
    let files = crate::source::unpack(&f.archive, src.path()).map_err(BuildError::from)?;
    let handler = crate::handler::resolve(f.language, f.handler.as_deref(), &files)
        .map_err(BuildError::from)?;

    progress("adding the runner");
    let mut layers = vec![runner_layer(&f.runner)?];
    if let Some((file, text)) = bootstrap(f.language) {
        let mut b = LayerBuilder::new();
        b.file(
            &format!("{RUNTIMES_DIR}/{file}"),
            0o644,
            text.as_bytes().to_vec(),
        )?;
        layers.push(b.finish(&format!("dispatch bootstrap {file}"))?);
    }
    let mut env = vec![
        ("DISPATCH_LANGUAGE".to_string(), f.language.to_string()),
        ("DISPATCH_HANDLER".to_string(), handler.handler.clone()),
        (
            "DISPATCH_FUNCTION_DIR".to_string(),
            FUNCTION_DIR.to_string(),
        ),
        (
            "DISPATCH_RUNTIMES_DIR".to_string(),
            RUNTIMES_DIR.to_string(),
        ),
        ("PORT".to_string(), PORT.to_string()),
    ];
    if let Some((layer, var)) = dependencies_layer(
        &base,
        f.language,
        f.dependencies.as_deref(),
        f.python_version.as_deref(),
        f.index_url.as_deref(),
        progress,
    )
    .await?
    {
        layers.push(layer);
        env.push((var.0.to_string(), var.1.to_string()));
    }
    let mut b = LayerBuilder::new();
    b.tree(FUNCTION_DIR, src.path())?;
    layers.push(b.finish(&format!("dispatch function {}", f.name))?);

    let plan = ImagePlan {
        base,
        target: target(&f.repository, &f.name, &f.digest),
        layers,
        config: ConfigChanges {
            env,
            entrypoint: vec![RUNNER_PATH.into(), "runner".into()],
            cmd: Vec::new(),
            working_dir: Some(FUNCTION_DIR.into()),
            exposed_ports: vec![PORT],
            labels: BTreeMap::from([
                ("dispatch.function".to_string(), f.name.clone()),
                ("dispatch.digest".to_string(), f.digest.clone()),
            ]),
        },
    };
    progress(&format!("pushing {}", plan.target));
    Ok(Built {
        pushed: registry.push(&plan).await?,
        handler: handler.handler,
    })
}

/// The layer of an image's dependencies installed for `base`'s platform, and the variable
/// that points the language at it; `None` without dependencies. Installs are kept for the
/// life of the process by what determines them (language, manifest, Python version, platform,
/// index): an image's functions share one install.
pub async fn dependencies_layer(
    base: &BaseImage,
    language: Language,
    manifest: Option<&str>,
    python_version: Option<&str>,
    index_url: Option<&str>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Option<(Layer, (&'static str, &'static str))>, ImageError> {
    type Key = (&'static str, String, String, String, Option<String>);
    static INSTALLS: OnceLock<Mutex<HashMap<Key, Layer>>> = OnceLock::new();
    let Some(manifest) = manifest.filter(|d| !d.trim().is_empty()) else {
        return Ok(None);
    };
    let arch = base.config["architecture"]
        .as_str()
        .unwrap_or("amd64")
        .to_string();
    let version = match language {
        Language::Python3 => match python_version {
            Some(v) => v.to_string(),
            None => base
                .env("PYTHON_VERSION")
                .map(str::to_string)
                .ok_or_else(|| {
                    ImageError::Invalid(format!(
                        "cannot tell the Python version of base image {}: it sets no \
                         PYTHON_VERSION; give it (e.g. --python-version 3.11)",
                        base.reference
                    ))
                })?,
        },
        _ => String::new(),
    };
    let var = match language {
        Language::Python3 => ("PYTHONPATH", PYTHON_DEPS_DIR),
        Language::Nodejs => ("NODE_PATH", NODE_DEPS_DIR),
        Language::Exec => {
            return Err(ImageError::Invalid(
                "exec functions have no dependencies to install".into(),
            ));
        }
    };
    let key = (
        language.as_str(),
        manifest.to_string(),
        version.clone(),
        arch.clone(),
        index_url.map(str::to_string),
    );
    let installs = INSTALLS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(layer) = installs.lock().get(&key) {
        return Ok(Some((layer.clone(), var)));
    }
    let layer = match language {
        Language::Python3 => {
            progress("installing dependencies with pip for the image's platform");
            pip_layer(manifest, &version, &arch, index_url).await?
        }
        _ => {
            progress("installing dependencies with npm");
            npm_layer(manifest, index_url).await?
        }
    };
    installs.lock().insert(key, layer.clone());
    Ok(Some((layer, var)))
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> ImageError {
    move |e| ImageError::Build(BuildError::Io(format!("{what}: {e}")))
}

/// The runner layer, made once per binary (it is the same for every function).
fn runner_layer(runner: &Path) -> Result<Layer, ImageError> {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: OnceLock<Mutex<Option<(Key, Layer)>>> = OnceLock::new();
    let meta = std::fs::metadata(runner)
        .map_err(|e| ImageError::Invalid(format!("the runner {}: {e}", runner.display())))?;
    let key = (runner.to_path_buf(), meta.len(), meta.modified().ok());
    let cache = CACHE.get_or_init(|| Mutex::new(None));
    if let Some((k, layer)) = &*cache.lock()
        && *k == key
    {
        return Ok(layer.clone());
    }
    let data = std::fs::read(runner).map_err(io("reading the runner"))?;
    let mut b = LayerBuilder::new();
    b.file(RUNNER_PATH, 0o755, data)?;
    let layer = b.finish("dispatch runner")?;
    *cache.lock() = Some((key, layer.clone()));
    Ok(layer)
}

/// pip's platform tag for an OCI architecture.
fn manylinux(arch: &str) -> Result<&'static str, ImageError> {
    match arch {
        "amd64" => Ok("manylinux2014_x86_64"),
        "arm64" => Ok("manylinux2014_aarch64"),
        other => Err(ImageError::Invalid(format!(
            "no wheels platform known for architecture {other:?} (amd64 and arm64 are)"
        ))),
    }
}

async fn pip_layer(
    requirements: &str,
    version: &str,
    arch: &str,
    index_url: Option<&str>,
) -> Result<Layer, ImageError> {
    let mut parts = version.split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        return Err(ImageError::Invalid(format!(
            "Python version {version:?} is not X.Y"
        )));
    };
    let python = find_program("python3").ok_or_else(|| BuildError::InterpreterMissing {
        name: "python3".into(),
    })?;
    let dir = tempfile::tempdir().map_err(io("a temporary folder"))?;
    std::fs::write(dir.path().join("requirements.txt"), requirements)
        .map_err(io("writing requirements.txt"))?;
    let target = dir.path().join("site");
    let mut pip = tokio::process::Command::new(python);
    pip.args(crate::build::PIP_INSTALL)
        .args([
            "--no-compile",
            "--only-binary=:all:",
            "--implementation",
            "cp",
        ])
        .args(["--platform", manylinux(arch)?])
        .args(["--python-version", &format!("{major}.{minor}")])
        .arg("--target")
        .arg(&target)
        .args(["-r", "requirements.txt"]);
    if let Some(url) = index_url {
        pip.args(["--index-url", url]);
    }
    run_tool("pip install", &mut pip, dir.path())
        .await
        .map_err(|(_, e)| e)?;
    let mut b = LayerBuilder::new();
    b.tree(PYTHON_DEPS_DIR, &target)?;
    Ok(b.finish("dispatch dependencies (pip)")?)
}

async fn npm_layer(package_json: &str, index_url: Option<&str>) -> Result<Layer, ImageError> {
    let npm =
        find_program("npm").ok_or_else(|| BuildError::InterpreterMissing { name: "npm".into() })?;
    let dir = tempfile::tempdir().map_err(io("a temporary folder"))?;
    std::fs::write(dir.path().join("package.json"), package_json)
        .map_err(io("writing package.json"))?;
    let mut cmd = tokio::process::Command::new(npm);
    // No install scripts: nothing is built for this machine instead of the image's.
    cmd.args(crate::build::NPM_INSTALL).arg("--ignore-scripts");
    if let Some(url) = index_url {
        cmd.args(["--registry", url]);
    }
    run_tool("npm install", &mut cmd, dir.path())
        .await
        .map_err(|(_, e)| e)?;
    let modules = dir.path().join("node_modules");
    let native = native_packages(&modules);
    if !native.is_empty() {
        return Err(ImageError::Invalid(format!(
            "npm package(s) {} need a native build, which function images do not run; use \
             pure JavaScript packages",
            native.join(", ")
        )));
    }
    let mut b = LayerBuilder::new();
    if modules.is_dir() {
        b.tree(NODE_DEPS_DIR, &modules)?;
    } else {
        b.dir(NODE_DEPS_DIR)?;
    }
    Ok(b.finish("dispatch dependencies (npm)")?)
}

/// Packages under `node_modules` with a `binding.gyp` (a native addon).
fn native_packages(modules: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![modules.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if e.file_name() == "binding.gyp"
                && let Some(pkg) = p.parent().and_then(|d| d.strip_prefix(modules).ok())
            {
                found.push(pkg.display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_the_content_digest() {
        assert_eq!(
            target("reg:5000/dispatch/", "hello", "sha256:abc123"),
            "reg:5000/dispatch/hello:abc123"
        );
    }

    #[test]
    fn wheels_platform_follows_the_base_architecture() {
        assert_eq!(manylinux("amd64").unwrap(), "manylinux2014_x86_64");
        assert_eq!(manylinux("arm64").unwrap(), "manylinux2014_aarch64");
        let err = manylinux("s390x").unwrap_err().to_string();
        assert!(err.contains("s390x"), "{err}");
    }

    #[test]
    fn native_addons_are_found_by_package() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        for (p, f) in [
            ("pure", "index.js"),
            ("addon", "binding.gyp"),
            ("@scope/other", "binding.gyp"),
        ] {
            std::fs::create_dir_all(m.join(p)).unwrap();
            std::fs::write(m.join(p).join(f), "").unwrap();
        }
        assert_eq!(native_packages(m), ["@scope/other", "addon"]);
    }
}
