//! One file per command. Shared here: kind names, waiting for a build to settle, and turning
//! manifest documents into objects the API takes (packing `spec.sourcePath`).

pub mod apply;
pub mod bench;
pub mod cancel;
pub mod completion;
pub mod config;
pub mod create;
pub mod delete;
pub mod describe;
pub mod diff;
pub mod emit;
pub mod exec;
pub mod execute;
pub mod explain;
pub mod gc;
pub mod get;
pub mod k8s;
pub mod login;
pub mod logs;
pub mod promote;
pub mod quickstart;
pub mod redeliver;
pub mod rollback;
pub mod runner;
pub mod runs;
pub mod server;
pub mod update;
pub mod version;
pub mod whoami;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_client::{Client, pack};
use dispatch_core::manifest::{Document, parse_manifest};
use dispatch_core::{Kind, Object, Phase};

/// What `get`/`delete` take: a resource kind, or runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Resource(Kind),
    Runs,
    JobExecutions,
    Tokens,
    Audit,
    Namespaces,
    Events,
    PulledImages,
    /// A function's versions (`get versions FUNCTION`).
    Versions,
}

/// The kinds `get` takes, as its help and errors name them (a test keeps them whole).
pub const GET_KINDS: &str = "base-image, image, function, endpoint (api), secret, jobtemplate, \
subscription, eventdriver, alias, run, jobexecution, event, token, namespace, audit, pulled-image \
or versions FUNCTION (singular or plural)";

/// The kinds `delete KIND NAME` takes.
pub const DELETE_KINDS: &str = "base-image, image, function, endpoint (api), secret, \
jobtemplate, subscription, eventdriver, alias (FUNCTION.ALIAS), token or namespace (singular or \
plural)";

pub fn parse_target(s: &str) -> Result<Target> {
    let norm: String = s
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    if matches!(norm.as_str(), "run" | "runs") {
        return Ok(Target::Runs);
    }
    if matches!(norm.as_str(), "jobexecution" | "jobexecutions") {
        return Ok(Target::JobExecutions);
    }
    if matches!(norm.as_str(), "token" | "tokens") {
        return Ok(Target::Tokens);
    }
    if matches!(norm.as_str(), "namespace" | "namespaces" | "ns") {
        return Ok(Target::Namespaces);
    }
    if matches!(norm.as_str(), "event" | "events") {
        return Ok(Target::Events);
    }
    if norm == "audit" {
        return Ok(Target::Audit);
    }
    if matches!(norm.as_str(), "pulledimage" | "pulledimages") {
        return Ok(Target::PulledImages);
    }
    if matches!(norm.as_str(), "version" | "versions") {
        return Ok(Target::Versions);
    }
    Kind::parse(s)
        .map(Target::Resource)
        .with_context(|| format!("unknown kind {s:?}: use {GET_KINDS}"))
}

/// `--wait` / `--no-wait`: wait for a build to settle. Default: wait when stderr is a
/// terminal (interactive use), not in scripts.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct WaitArgs {
    /// Wait until it is READY, showing progress (exit 1 on ERROR); default when interactive
    #[arg(long, conflicts_with = "no_wait")]
    pub wait: bool,
    /// Return at once; watch with `dispatch get KIND NAME`
    #[arg(long)]
    pub no_wait: bool,
}

impl WaitArgs {
    pub fn resolve(self) -> bool {
        self.wait || (!self.no_wait && std::io::stderr().is_terminal())
    }
}

/// Polls until `kind/name` is READY or ERROR (or `timeout` passes); shows the phase on a TTY
/// (one line, redrawn), and otherwise (CI logs) a line per step and one for the outcome.
pub async fn wait_settled(
    client: &Client,
    kind: Kind,
    name: &str,
    timeout: Duration,
) -> Result<Object> {
    let deadline = Instant::now() + timeout;
    let tty = std::io::stderr().is_terminal();
    // On a terminal one line, redrawn (indicatif hides itself when stderr is not one).
    let spinner =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let mut last: Option<(Phase, String)> = None;
    let result = loop {
        let o = match client.get(kind, name).await {
            Ok(o) => o,
            Err(e) => break Err(e.into()),
        };
        let phase = o.phase().unwrap_or(Phase::Initialized);
        let step = if o.status.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", o.status.reason)
        };
        let line = format!(
            "{} {name} {phase}{step} ({:.0}s)",
            kind.human(),
            started.elapsed().as_secs_f64()
        );
        let now = (phase, o.status.reason.clone());
        if !tty && last.as_ref() != Some(&now) {
            eprintln!("{line}");
            last = Some(now);
        }
        spinner.set_message(line);
        // Settled for the spec as it is now: a phase from before the last change (the
        // controller has not seen it yet) does not count.
        let current = match (o.metadata.generation, o.status.observed_generation) {
            (Some(g), Some(seen)) => seen >= g,
            _ => true,
        };
        if current && matches!(phase, Phase::Ready | Phase::Error) {
            break Ok(o);
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "{} {name} is still {phase} after {timeout:?}: check `dispatch get {} {name} -o json`",
                kind.human(),
                kind.cli_name()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The last state stays on the terminal, without the spinner.
    spinner
        .set_style(indicatif::ProgressStyle::with_template("  {msg}").expect("a valid template"));
    spinner.finish();
    result
}

/// Fails with the reason when a waited-for resource ended in ERROR.
pub fn ensure_ready(o: &Object) -> Result<()> {
    if o.phase() == Some(Phase::Error) {
        bail!(
            "{} {} failed: {}",
            o.kind.human(),
            o.name(),
            o.status.reason
        );
    }
    Ok(())
}

/// Reads a manifest from a file, a folder (its `.yaml`, `.yml` and `.json` files in name
/// order, as `kubectl apply -f DIR`) or `-` (stdin); relative `sourcePath`s resolve against
/// the file's folder (the folder itself; the current one for stdin).
pub fn read_manifest(file: &Path) -> Result<(Vec<Document>, PathBuf)> {
    let (texts, base) = manifest_texts(file)?;
    let mut docs = Vec::new();
    for (name, text) in texts {
        docs.extend(parse_manifest(&text).with_context(|| name)?);
    }
    Ok((docs, base))
}

/// [`read_manifest`] with job executions too (`dispatch apply -f`), in file order.
pub fn read_entries(file: &Path) -> Result<(Vec<dispatch_core::manifest::Entry>, PathBuf)> {
    let (texts, base) = manifest_texts(file)?;
    let mut entries = Vec::new();
    for (name, text) in texts {
        entries.extend(dispatch_core::manifest::parse_entries(&text).with_context(|| name)?);
    }
    Ok((entries, base))
}

/// The manifest files' names and texts, and the folder relative paths start from.
fn manifest_texts(file: &Path) -> Result<(Vec<(String, String)>, PathBuf)> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("failed to read the manifest from stdin")?;
        return Ok((
            vec![("stdin".into(), s)],
            std::env::current_dir().unwrap_or_default(),
        ));
    }
    let read = |f: &Path| {
        std::fs::read_to_string(f).with_context(|| format!("failed to read {}", f.display()))
    };
    if file.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(file)
            .with_context(|| format!("failed to read the folder {}", file.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            anyhow::bail!(
                "{} has no manifest: it holds no .yaml, .yml or .json file",
                file.display()
            );
        }
        let texts = files
            .iter()
            .map(|f| Ok((f.display().to_string(), read(f)?)))
            .collect::<Result<Vec<_>>>()?;
        return Ok((texts, file.to_path_buf()));
    }
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((vec![(file.display().to_string(), read(file)?)], base))
}

/// Packs and uploads `path` as the source of function `name` in `ns`; returns its digest.
pub async fn upload(client: &Client, ns: &str, name: &str, path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    let archive = tokio::task::spawn_blocking(move || pack::pack_path(&p))
        .await?
        .with_context(|| format!("failed to pack the function source {}", path.display()))?;
    Ok(client.upload_source(ns, name, archive).await?)
}

/// A manifest document as the API takes it: namespace filled, a Function's client-side
/// `spec.sourcePath` packed, uploaded and replaced by `spec.source`, an Image's
/// `spec.runtimeDependencies.manifestPath` read into `manifest`.
pub async fn prepare(client: &Client, doc: &Document, base: &Path) -> Result<Object> {
    let mut o = doc.object.clone();
    if o.metadata.namespace.is_none() {
        o.metadata.namespace = Some(client.namespace().to_string());
    }
    if o.kind == Kind::Image {
        // Client-side `spec.runtimeDependencies.manifestPath`: the file's text becomes `manifest`.
        let path = o
            .spec
            .get_mut("runtimeDependencies")
            .and_then(|d| d.as_object_mut())
            .and_then(|d| d.remove("manifestPath"))
            .map(|p| base.join(p.as_str().unwrap_or_default()));
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "document {} (image {}): failed to read runtimeDependencies.manifestPath {}",
                    doc.index,
                    o.metadata.name,
                    path.display()
                )
            })?;
            o.spec["runtimeDependencies"]["manifest"] = text.into();
        }
    }
    if o.kind == Kind::Function {
        let source_path = o
            .spec
            .as_object_mut()
            .and_then(|m| m.remove("sourcePath"))
            .and_then(|v| v.as_str().map(str::to_string));
        if let Some(sp) = source_path {
            let path = base.join(&sp);
            let digest = upload(client, o.namespace(), o.name(), &path)
                .await
                .with_context(|| format!("document {} (function {})", doc.index, o.name()))?;
            if let Some(m) = o.spec.as_object_mut() {
                m.insert("source".into(), digest.into());
            }
        }
    }
    Ok(o)
}

/// `K=V` pairs of `--env`.
pub fn parse_env(pairs: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {p:?} is not KEY=VALUE"))
        })
        .collect()
}

/// Prints `kind/name verb`, like kubectl.
pub fn say(o: &Object, verb: &str) {
    said(&mut crate::output::Report::new(None), o, verb);
}

/// Reports `kind/name verb`, like kubectl (or the object, or its name: `-o`).
pub fn said(report: &mut crate::output::Report, o: &Object, verb: &str) {
    report.done(
        o.kind.cli_name(),
        o.name(),
        verb,
        serde_json::to_value(o).unwrap_or_default(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every help that lists kinds names every kind it takes (they named fewer).
    #[test]
    fn kind_lists_name_every_kind() {
        for kind in Kind::ALL {
            for (what, list) in [("get", GET_KINDS), ("delete", DELETE_KINDS)] {
                assert!(list.contains(kind.cli_name()), "{what}: {kind}");
            }
        }
        for word in [
            "run",
            "jobexecution",
            "event",
            "token",
            "namespace",
            "audit",
        ] {
            assert!(GET_KINDS.contains(word), "{word}");
            parse_target(word).unwrap();
        }
        for word in ["token", "namespace"] {
            assert!(DELETE_KINDS.contains(word), "{word}");
        }
        assert!(
            parse_target("widget")
                .unwrap_err()
                .to_string()
                .contains("eventdriver")
        );
    }
}
