//! `dispatch apply -f FILE|-`: create what is missing, update what changed, leave the rest.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use super::{prepare, read_manifest, said};
use crate::Ctx;

/// Create or update every resource of a YAML/JSON manifest (multi-document)
#[derive(Debug, clap::Args)]
pub struct Apply {
    /// Manifest file (`-` reads stdin); a Function's spec.sourcePath is packed and uploaded
    #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
    pub file: PathBuf,
    /// Print what was applied as json or yaml, or name (kind/name lines); default: a line
    /// per resource (created, configured or unchanged)
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<crate::output::Done>,
    /// Say what would be created, configured or left unchanged, and store no resource (the
    /// server validates and normalizes each one; a function's source is uploaded as a blob)
    #[arg(long)]
    pub dry_run: bool,
}

impl Apply {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let mut report = crate::output::Report::new(self.output);
        if self.dry_run {
            for p in super::diff::plan(ctx, &self.file).await? {
                let verb = format!("{} (dry run)", p.verb);
                said(&mut report, &p.object, &verb);
            }
            report.finish()?;
            return Ok(ExitCode::SUCCESS);
        }
        let (docs, base) = read_manifest(&self.file)?;
        for d in &docs {
            let at = || d.label();
            let o = prepare(c, d, &base).await.with_context(at)?;
            let ns = o.namespace().to_string();
            // A write of the server's own (the controller recording a build's status) between
            // the read and the update is a conflict that is not the user's: read and apply
            // again, a few times.
            let mut attempts = 0;
            loop {
                attempts += 1;
                let existing = c
                    .get_optional(&ns, o.kind, o.name())
                    .await
                    .with_context(at)?;
                match existing {
                    None => {
                        said(
                            &mut report,
                            &c.create(&o).await.with_context(at)?,
                            "created",
                        );
                        break;
                    }
                    Some(e) => {
                        let mut next = o.clone();
                        next.metadata.resource_version = e.metadata.resource_version.clone();
                        let updated = match c.update(&next).await {
                            Ok(u) => u,
                            Err(err) if err.code() == Some("Conflict") && attempts < 5 => continue,
                            Err(err) => return Err(err).with_context(at),
                        };
                        let changed = updated.metadata.generation != e.metadata.generation
                            || updated.metadata.labels != e.metadata.labels;
                        let verb = if changed { "configured" } else { "unchanged" };
                        said(&mut report, &updated, verb);
                        break;
                    }
                }
            }
        }
        report.finish()?;
        Ok(ExitCode::SUCCESS)
    }
}
