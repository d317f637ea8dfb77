//! `dispatch diff -f FILE` and `dispatch apply --dry-run`: what applying a manifest would
//! change, from the server's own validation and normalization (`?dryRun=true`: no resource
//! is stored; a function's source is uploaded, as a content-addressed blob that `dispatch gc`
//! removes when nothing names it, so that its handler is checked too), as a unified diff of
//! each resource's labels and spec (a `JobExecution` document: its template and payload
//! against the execution of its name).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use dispatch_core::{Kind, Object};

use dispatch_core::manifest::Entry;

use super::{prepare, read_entries};
use crate::Ctx;

/// Show what `apply -f FILE` would change, without changing anything (exit 1 when it would)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Compares every resource of a manifest with what the server stores, \
after the server's own validation and normalization (a dry run: no resource is stored; a \
function's source archive is uploaded, and gc removes it when nothing names it), and prints a unified diff of each resource's labels and spec (a `JobExecution` document: its template and payload against the
//! execution of its name). Exits 0 when applying \
would change nothing, 1 when it would (like diff(1) and kubectl diff), and with an error when \
the manifest is not valid.\n\nExample: dispatch diff -f examples/seed.yaml"
)]
pub struct Diff {
    /// Manifest file, or a folder of them (`-` reads stdin)
    #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
    pub file: PathBuf,
}

/// What applying one document would do.
pub struct Planned {
    pub object: Object,
    /// `created`, `configured` or `unchanged`.
    pub verb: &'static str,
    /// The unified diff of labels and spec (empty when unchanged).
    pub diff: String,
}

/// Labels and spec as YAML: what a diff compares. Secrets compare their keys only (their
/// values are sealed with a fresh nonce each time).
fn comparable(o: Option<&Object>) -> String {
    let Some(o) = o else {
        return String::new();
    };
    let mut spec = o.spec.clone();
    if o.kind == Kind::Secret
        && let Some(m) = spec.as_object_mut()
    {
        m.retain(|k, _| k == "keys");
    }
    let v = serde_json::json!({"metadata": {"labels": o.metadata.labels}, "spec": spec});
    serde_saphyr::to_string(&v).unwrap_or_default()
}

/// Plans every document of a manifest against the server (dry runs). A `JobExecution`
/// document compares its template and payload with the execution of its name: one that does
/// not exist would be started, one that differs cannot be applied (an execution does not
/// change).
pub async fn plan(ctx: &Ctx, file: &std::path::Path) -> Result<Vec<String>> {
    let (entries, base) = read_entries(file)?;
    let mut diffs = Vec::new();
    for entry in &entries {
        match entry {
            Entry::Resource(d) => {
                for p in plan_documents(ctx, std::iter::once(d.as_ref()), &base).await? {
                    diffs.push(p.diff);
                }
            }
            Entry::Execution(x) => {
                let c = &ctx.client;
                let ns = x.namespace.as_deref().unwrap_or(c.namespace());
                let stored = c
                    .get_job_in(ns, &x.name)
                    .await
                    .with_context(|| format!("document {} (JobExecution {:?})", x.index, x.name))?;
                let spec = |template: &str, payload: &str| {
                    let v = serde_json::json!({"spec": {"jobTemplateName": template, "payload": payload}});
                    serde_saphyr::to_string(&v).unwrap_or_default()
                };
                let before = stored
                    .map(|j| spec(&j.name, &j.payload))
                    .unwrap_or_default();
                diffs.push(unified(
                    &format!("jobexecution/{}", x.name),
                    &before,
                    &spec(&x.template, &x.payload),
                ));
            }
        }
    }
    Ok(diffs)
}

/// The unified diff of one object's `before` and `after` text (empty when they are equal).
fn unified(label: &str, before: &str, after: &str) -> String {
    if before == after {
        return String::new();
    }
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{label} (stored)"), &format!("{label} (manifest)"))
        .to_string()
}

/// Plans these documents (`base`: where their relative paths start).
pub async fn plan_documents(
    ctx: &Ctx,
    docs: impl Iterator<Item = &dispatch_core::manifest::Document>,
    base: &std::path::Path,
) -> Result<Vec<Planned>> {
    let c = &ctx.client;
    let mut out = Vec::new();
    for d in docs {
        let at = || d.label();
        let o = prepare(c, d, base).await.with_context(at)?;
        let existing = c
            .get_optional(o.namespace(), o.kind, o.name())
            .await
            .with_context(at)?;
        let (would, verb) = match &existing {
            None => (c.create_dry_run(&o).await.with_context(at)?, "created"),
            Some(e) => {
                let mut next = o.clone();
                next.metadata.resource_version = e.metadata.resource_version.clone();
                (
                    c.update_dry_run(&next).await.with_context(at)?,
                    "configured",
                )
            }
        };
        let (before, after) = (comparable(existing.as_ref()), comparable(Some(&would)));
        let label = format!("{}/{}", o.kind.cli_name(), o.name());
        let diff = unified(&label, &before, &after);
        let verb = if diff.is_empty() { "unchanged" } else { verb };
        out.push(Planned {
            object: would,
            verb,
            diff,
        });
    }
    Ok(out)
}

impl Diff {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let mut changes = false;
        for diff in plan(ctx, &self.file).await? {
            if !diff.is_empty() {
                changes = true;
                print!("{diff}");
            }
        }
        Ok(if changes {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
