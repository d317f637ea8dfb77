//! `dispatch apply -f FILE|DIR|-`: create what is missing, update what changed, leave the
//! rest; then start the job executions (dispatcher's `JobExecution` documents) not started.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use dispatch_core::manifest::{Entry, ExecutionDoc};

use super::{prepare, read_entries, said};
use crate::Ctx;

/// Create or update every resource of a YAML/JSON manifest (multi-document)
#[derive(Debug, clap::Args)]
pub struct Apply {
    /// Manifest file, or a folder of them (`-` reads stdin); a Function's spec.sourcePath is
    /// packed and uploaded
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
        let (entries, base) = read_entries(&self.file)?;
        if self.dry_run {
            let docs = entries.iter().filter_map(|e| match e {
                Entry::Resource(d) => Some(d.as_ref()),
                Entry::Execution(_) => None,
            });
            for p in super::diff::plan_documents(ctx, docs, &base).await? {
                let verb = format!("{} (dry run)", p.verb);
                said(&mut report, &p.object, &verb);
            }
        }
        // Resources first, then job executions: an execution runs a template, which may be
        // in the same manifest (or folder) after it.
        if !self.dry_run {
            for entry in &entries {
                if let Entry::Resource(d) = entry {
                    resource(c, &mut report, d, &base).await?;
                }
            }
        }
        for entry in &entries {
            if let Entry::Execution(x) = entry {
                execution(c, &mut report, x, self.dry_run).await?;
            }
        }
        report.finish()?;
        Ok(ExitCode::SUCCESS)
    }
}

/// Creates or updates one resource of the manifest.
async fn resource(
    c: &dispatch_client::Client,
    report: &mut crate::output::Report,
    d: &dispatch_core::manifest::Document,
    base: &std::path::Path,
) -> Result<()> {
    let at = || d.label();
    let o = prepare(c, d, base).await.with_context(at)?;
    let ns = o.namespace().to_string();
    // An alias names versions of its function: one applied just before (the same manifest)
    // has its version once its build settles.
    if o.kind == dispatch_core::Kind::Alias
        && let Ok(spec) = o.typed_spec::<dispatch_core::versions::AliasSpec>()
        && let Ok((function, _)) = dispatch_core::versions::AliasSpec::split_name(o.name())
    {
        let function = if spec.function.is_empty() {
            function
        } else {
            &spec.function
        };
        if let Ok(Some(f)) = c
            .get_optional(&ns, dispatch_core::Kind::Function, function)
            .await
            && (f.status.observed_generation != f.metadata.generation
                || f.phase() != Some(dispatch_core::Phase::Ready))
        {
            super::wait_settled(
                c,
                dispatch_core::Kind::Function,
                function,
                super::create::WAIT,
            )
            .await
            .with_context(at)?;
        }
    }
    // A write of the server's own (the controller recording a build's status) between the
    // read and the update is a conflict that is not the user's: read and apply again, a few
    // times.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let existing = c
            .get_optional(&ns, o.kind, o.name())
            .await
            .with_context(at)?;
        let Some(e) = existing else {
            said(report, &c.create(&o).await.with_context(at)?, "created");
            return Ok(());
        };
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
        said(report, &updated, verb);
        return Ok(());
    }
}

/// Starts a `JobExecution` of the manifest unless one of its name exists: `unchanged` when
/// that one ran the same template with the same payload, an error otherwise (an execution
/// does not change).
async fn execution(
    c: &dispatch_client::Client,
    report: &mut crate::output::Report,
    x: &ExecutionDoc,
    dry_run: bool,
) -> Result<()> {
    let at = || format!("document {} (job execution {})", x.index, x.name);
    let ns = x
        .namespace
        .clone()
        .unwrap_or_else(|| c.namespace().to_string());
    if let Some(j) = c.get_job_in(&ns, &x.name).await.with_context(at)? {
        if j.name != x.template || j.payload != x.payload {
            anyhow::bail!(
                "{}: job execution {:?} exists and ran job template {:?} with another payload: \
                 an execution does not change; apply it under a new name",
                at(),
                x.name,
                j.name
            );
        }
        let verb = if dry_run {
            "unchanged (dry run)"
        } else {
            "unchanged"
        };
        report.done("jobexecution", &x.name, verb, j.to_resource());
        return Ok(());
    }
    let resource = x.to_resource(&ns);
    if dry_run {
        report.done("jobexecution", &x.name, "created (dry run)", resource);
        return Ok(());
    }
    let created = c
        .create_job_execution(&ns, &resource)
        .await
        .with_context(at)?;
    report.done("jobexecution", &x.name, "created", created);
    Ok(())
}
