//! `dispatch diff -f FILE` and `dispatch apply --dry-run`: what applying a manifest would
//! change, from the server's own validation and normalization (`?dryRun=true`: no resource
//! is stored; a function's source is uploaded, as a content-addressed blob that `dispatch gc`
//! removes when nothing names it, so that its handler is checked too), as a unified diff of
//! each resource's labels and spec.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use dispatch_core::{Kind, Object};

use super::{prepare, read_manifest};
use crate::Ctx;

/// Show what `apply -f FILE` would change, without changing anything (exit 1 when it would)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Compares every resource of a manifest with what the server stores, \
after the server's own validation and normalization (a dry run: no resource is stored; a \
function's source archive is uploaded, and gc removes it when nothing names it), and prints a unified diff of each resource's labels and spec. Exits 0 when applying \
would change nothing, 1 when it would (like diff(1) and kubectl diff), and with an error when \
the manifest is not valid.\n\nExample: dispatch diff -f examples/seed.yaml"
)]
pub struct Diff {
    /// Manifest file (`-` reads stdin)
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

/// Plans every document of a manifest against the server (dry runs).
pub async fn plan(ctx: &Ctx, file: &std::path::Path) -> Result<Vec<Planned>> {
    let (docs, base) = read_manifest(file)?;
    plan_documents(ctx, docs.iter(), &base).await
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
        let (verb, diff) = if before == after {
            ("unchanged", String::new())
        } else {
            let diff = similar::TextDiff::from_lines(&before, &after)
                .unified_diff()
                .context_radius(3)
                .header(&format!("{label} (stored)"), &format!("{label} (manifest)"))
                .to_string();
            (verb, diff)
        };
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
        let planned = plan(ctx, &self.file).await?;
        let mut changes = false;
        for p in &planned {
            if !p.diff.is_empty() {
                changes = true;
                print!("{}", p.diff);
            }
        }
        Ok(if changes {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
