//! `dispatch delete KIND NAME…` or `dispatch delete -f FILE` (documents in reverse order, so
//! that endpoints go before their functions and functions before their images).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

use dispatch_core::manifest::Entry;

use super::{Target, parse_target, read_entries, say};
use crate::Ctx;

/// Delete resources by name, or every resource of a manifest
#[derive(Debug, clap::Args)]
pub struct Delete {
    #[arg(required_unless_present = "file", help = super::DELETE_KINDS)]
    pub kind: Option<String>,
    /// Names to delete
    pub names: Vec<String>,
    /// Delete what a manifest (or a folder of them) declares (`-` reads stdin)
    #[arg(short = 'f', long = "file", conflicts_with = "kind")]
    pub file: Option<PathBuf>,
    /// With -f: skip resources that do not exist
    #[arg(long)]
    pub ignore_not_found: bool,
    /// Namespaces: delete everything in it too
    #[arg(long)]
    pub cascade: bool,
}

impl Delete {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        if let Some(file) = self.file {
            let (entries, _) = read_entries(&file)?;
            // Job executions first (their templates may come before them), then resources in
            // reverse order.
            let executions = entries.iter().filter(|e| matches!(e, Entry::Execution(_)));
            let resources = entries.iter().filter(|e| matches!(e, Entry::Resource(_)));
            for entry in executions.chain(resources.rev()) {
                let x = match entry {
                    Entry::Resource(d) => {
                        let o = &d.object;
                        let ns = o.metadata.namespace.as_deref().unwrap_or(c.namespace());
                        match c.delete_in(ns, o.kind, o.name()).await {
                            Ok(gone) => say(&gone, "deleted"),
                            Err(e) if self.ignore_not_found && e.code() == Some("NotFound") => {}
                            Err(e) => {
                                return Err(e).with_context(|| d.label());
                            }
                        }
                        continue;
                    }
                    Entry::Execution(x) => x,
                };
                // A job execution is a record: deleting its document stops it if it still
                // runs (as deleting its custom resource does); the record goes with its
                // template.
                let ns = x.namespace.as_deref().unwrap_or(c.namespace());
                match c.cancel_job_in(ns, &x.name).await {
                    Ok(_) => println!("jobexecution/{} cancelled", x.name),
                    Err(e) if e.code() == Some("Conflict") => {
                        println!("jobexecution/{} ended already (its record stays)", x.name)
                    }
                    Err(e) if self.ignore_not_found && e.code() == Some("NotFound") => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("document {} (JobExecution {:?})", x.index, x.name)
                        });
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        let kind = match parse_target(self.kind.as_deref().unwrap_or_default())? {
            Target::Resource(k) => k,
            Target::Namespaces => {
                if self.names.is_empty() {
                    bail!(
                        "name the namespace to delete: dispatch delete namespace NAME [--cascade]"
                    );
                }
                for n in &self.names {
                    let r = c.delete_namespace(n, self.cascade).await?;
                    println!(
                        "namespace/{n} deleted ({} resources)",
                        r["resources"].as_u64().unwrap_or(0)
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            Target::Tokens => {
                if self.names.is_empty() {
                    bail!("name the token to delete: dispatch delete token NAME");
                }
                for n in &self.names {
                    c.delete_token(n).await?;
                    println!("token/{n} deleted");
                }
                return Ok(ExitCode::SUCCESS);
            }
            Target::Versions => bail!(
                "a function's versions go with it, or as newer ones come (the newest 10 are kept); `dispatch rollback FUNCTION --to N` returns to one"
            ),
            Target::PulledImages => bail!(
                "pulled images go with `dispatch gc` (those unused for its --grace, default 1h; by itself the server collects those unused for a day)"
            ),
            Target::Runs | Target::JobExecutions | Target::Audit | Target::Events => bail!(
                "runs and job executions are not deleted one by one: `dispatch cancel run ID | jobexecution UUID` stops one; runs: `dispatch runs purge`; executions go with their template or their ttlSecondsAfterFinished"
            ),
        };
        if self.names.is_empty() {
            bail!(
                "name the {} to delete: dispatch delete {} NAME",
                kind.human(),
                kind.cli_name()
            );
        }
        for name in &self.names {
            let gone = c.delete(kind, name).await?;
            say(&gone, "deleted");
        }
        Ok(ExitCode::SUCCESS)
    }
}
