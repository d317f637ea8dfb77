//! `dispatch get KIND [NAME]`: tables like Dispatch's, or `-o json|yaml`.

use std::process::ExitCode;

use anyhow::Result;
use dispatch_client::RunQuery;
use dispatch_core::{JobExecution, Run};

use super::{Target, parse_target};
use crate::Ctx;
use crate::output::{
    Format, jobs_table, objects_table, print_structured, runs_table, short_digest, table,
};

/// Show resources, runs or job executions
#[derive(Debug, clap::Args)]
pub struct Get {
    #[arg(help = super::GET_KINDS)]
    pub kind: String,
    /// One resource (or run id); all when omitted
    pub name: Option<String>,
    /// Output format: table, wide, json, yaml, name (kind/name lines), or jsonpath=TEMPLATE as
    /// kubectl reads it: `-o jsonpath='{.items[*].metadata.name}'`, or
    /// `'{range .items[*]}{.metadata.name}{"\t"}{.status.phase}{"\n"}{end}'` (a list is
    /// `{"kind":"List","items":[…]}`; one resource is the object itself)
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table",
          value_parser = crate::output::parse_get_format)]
    pub output: Format,
    /// Tables without their header and rule (for scripts)
    #[arg(long)]
    pub no_headers: bool,
    /// Resources: keep watching — after the list, a line (or object) for each resource that
    /// changes, appears or goes, until interrupted (polls every second)
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Resources: only those with these labels (key=value, comma-separated: all must match)
    #[arg(short = 'l', long = "selector", value_name = "KEY=VALUE[,…]")]
    pub selector: Option<String>,
    /// Runs: only this function's
    #[arg(long)]
    pub function: Option<String>,
    /// Runs: only this status (queued, running, succeeded, failed, timeout, cancelled, dead)
    #[arg(long)]
    pub status: Option<String>,
    /// Events: only this type
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Events: only those with a delivery not queued (pending: waiting for room in its
    /// function's queue; dead: its TTL ended first — `dispatch redeliver` sends it again)
    #[arg(long)]
    pub undelivered: bool,
    /// Secrets: show the values too (admin tokens only)
    #[arg(long)]
    pub reveal: bool,
    /// Job executions: only this template's
    #[arg(long)]
    pub template: Option<String>,
    /// Runs: at most this many, newest first (default 100)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Runs: the next page — runs older than this run id (the last one shown); with -o json
    /// or yaml the last id is the last element's "id"
    #[arg(long, value_name = "RUN_ID")]
    pub after: Option<String>,
    /// Runs: created at or after this time (2026-12-05T10:00:00Z) or this long ago (15m, 2h, 7d)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Runs: created before this time or this long ago
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

impl Get {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        crate::output::set_no_headers(self.no_headers);
        let target = parse_target(&self.kind)?;
        if let Some(sel) = &self.selector {
            if !matches!(target, Target::Resource(_)) || self.name.is_some() {
                anyhow::bail!(
                    "-l/--selector filters a list of resources (functions, images, …): drop it here"
                );
            }
            if let Some(bad) = sel
                .split(',')
                .find(|p| p.split_once('=').is_none_or(|(k, _)| k.trim().is_empty()))
            {
                anyhow::bail!(
                    "-l {sel:?}: {bad:?} is not key=value (write -l team=web or -l team=web,tier=api)"
                );
            }
        }
        if self.watch {
            let Target::Resource(kind) = target else {
                anyhow::bail!(
                    "--watch follows resources (functions, images, …), not {}",
                    self.kind
                );
            };
            return watch(
                c,
                kind,
                self.name.as_deref(),
                self.selector.as_deref(),
                self.output,
            )
            .await;
        }
        match target {
            Target::Resource(kind) => match self.name {
                Some(name) => {
                    let o = if self.reveal {
                        if kind != dispatch_core::Kind::Secret {
                            anyhow::bail!("--reveal is for secrets");
                        }
                        c.get_revealed(kind, &name).await?
                    } else {
                        c.get(kind, &name).await?
                    };
                    match self.output {
                        Format::Wide => print!(
                            "{}",
                            crate::output::objects_table_wide(kind, std::slice::from_ref(&o), true)
                        ),
                        Format::Table => {
                            print!("{}", objects_table(kind, std::slice::from_ref(&o)));
                            if kind == dispatch_core::Kind::Function {
                                print_queue(&c.function_queue(&name).await?);
                            }
                            if kind == dispatch_core::Kind::Subscription {
                                print_deliveries(&c.subscription_deliveries(&name).await?);
                            }
                        }
                        f => print_structured(&o, f)?,
                    }
                }
                None => {
                    let items = c.list_selected(kind, self.selector.as_deref()).await?;
                    match self.output {
                        Format::Table => print!("{}", objects_table(kind, &items)),
                        Format::Wide => {
                            print!("{}", crate::output::objects_table_wide(kind, &items, true))
                        }
                        f => print_structured(&items, f)?,
                    }
                }
            },
            Target::Events => {
                let events = c
                    .list_events(
                        self.event_type.as_deref(),
                        self.undelivered,
                        self.limit.unwrap_or(100),
                    )
                    .await?;
                match self.output {
                    Format::Table => print!(
                        "{}",
                        table(
                            &["ID", "TYPE", "SOURCE", "DELIVERIES", "RECEIVED"],
                            &events
                                .iter()
                                .map(|e| {
                                    let s = |v: &serde_json::Value| {
                                        v.as_str().unwrap_or("").to_string()
                                    };
                                    vec![
                                        s(&e["event"]["id"]),
                                        s(&e["event"]["type"]),
                                        s(&e["event"]["source"]),
                                        deliveries_cell(&e["matched"]),
                                        s(&e["receivedAt"]),
                                    ]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f => print_structured(&events, f)?,
                }
            }
            Target::Namespaces => {
                let items = match &self.name {
                    Some(n) => vec![c.get_namespace(n).await?],
                    None => c.list_namespaces().await?,
                };
                match self.output {
                    Format::Table => print!(
                        "{}",
                        table(
                            &["NAME", "RUN HISTORY", "BUDGET", "CREATED DATE"],
                            &items
                                .iter()
                                .map(|n| {
                                    let created = n["metadata"]["createdAt"]
                                        .as_str()
                                        .and_then(|t| t.parse().ok());
                                    let h = &n["status"]["runHistory"];
                                    let size = |v: &serde_json::Value| {
                                        v.as_u64().map_or_else(
                                            || "none".to_string(),
                                            dispatch_core::quantity::human_bytes,
                                        )
                                    };
                                    let from = match h["budgetFrom"].as_str() {
                                        Some("namespace") => " (own)",
                                        _ => "",
                                    };
                                    vec![
                                        n["metadata"]["name"].as_str().unwrap_or("").to_string(),
                                        format!(
                                            "{} runs, {}",
                                            h["runs"].as_u64().unwrap_or(0),
                                            size(&h["bytes"])
                                        ),
                                        format!("{}{from}", size(&h["budget"])),
                                        crate::output::date(created),
                                    ]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f if self.name.is_some() => print_structured(&items[0], f)?,
                    f => print_structured(&items, f)?,
                }
            }
            Target::Tokens => {
                let tokens = c.list_tokens().await?;
                match self.output {
                    Format::Table => print!(
                        "{}",
                        table(
                            &["NAME", "ROLE", "NAMESPACE", "EXPIRES", "CREATED DATE"],
                            &tokens
                                .iter()
                                .map(|t| {
                                    let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
                                    // One date format across tables (was RFC 3339 with ns).
                                    let exp = match t["expiresAt"].as_str() {
                                        Some(e) => date_of(e),
                                        None => "never".into(),
                                    };
                                    let created = date_of(t["createdAt"].as_str().unwrap_or(""));
                                    vec![s("name"), s("role"), s("namespace"), exp, created]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f => print_structured(&tokens, f)?,
                }
            }
            Target::Versions => {
                let Some(function) = &self.name else {
                    anyhow::bail!(
                        "say whose versions: dispatch get versions FUNCTION (dispatch get functions lists them)"
                    );
                };
                let versions = c.versions(function).await?;
                let serving = c
                    .get(dispatch_core::Kind::Function, function)
                    .await
                    .ok()
                    .and_then(|f| f.status.digest);
                match self.output {
                    Format::Table | Format::Wide => {
                        let rows: Vec<Vec<String>> = versions
                            .iter()
                            .map(|v| {
                                let digest = v["digest"].as_str().unwrap_or("");
                                vec![
                                    v["version"].to_string(),
                                    short_digest(digest),
                                    short_digest(v["spec"]["source"].as_str().unwrap_or("")),
                                    date_of(v["createdAt"].as_str().unwrap_or("")),
                                    v["createdBy"].as_str().unwrap_or("-").to_string(),
                                    if serving.as_deref() == Some(digest) {
                                        "*".into()
                                    } else {
                                        String::new()
                                    },
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            table(
                                &["VERSION", "DIGEST", "SOURCE", "CREATED", "BY", "SERVING"],
                                &rows
                            )
                        )
                    }
                    f => print_structured(&versions, f)?,
                }
            }
            Target::PulledImages => {
                let images = c.pulled_images().await?;
                let images: Vec<_> = match &self.name {
                    // By a reference that resolved to it, or by digest (a prefix will do).
                    Some(n) => images
                        .into_iter()
                        .filter(|i| {
                            i["digest"]
                                .as_str()
                                .is_some_and(|d| d.starts_with(n.as_str()))
                                || i["references"]
                                    .as_array()
                                    .is_some_and(|r| r.iter().any(|x| x == n.as_str()))
                        })
                        .collect(),
                    None => images,
                };
                if let Some(n) = &self.name
                    && images.is_empty()
                {
                    anyhow::bail!("no pulled image {n:?} (a reference as written, or a digest)");
                }
                match self.output {
                    Format::Table | Format::Wide => print!(
                        "{}",
                        table(
                            &[
                                "REFERENCES",
                                "DIGEST",
                                "SIZE",
                                "DOWNLOADED",
                                "LAST USED",
                                "PULLED"
                            ],
                            &images
                                .iter()
                                .map(|i| {
                                    let refs = i["references"]
                                        .as_array()
                                        .map(|r| {
                                            r.iter()
                                                .filter_map(|x| x.as_str())
                                                .collect::<Vec<_>>()
                                                .join(",")
                                        })
                                        .unwrap_or_default();
                                    let digest = i["digest"].as_str().unwrap_or("");
                                    let bytes = |k: &str| {
                                        dispatch_core::quantity::human_bytes(
                                            i[k].as_u64().unwrap_or(0),
                                        )
                                    };
                                    vec![
                                        refs,
                                        digest[..digest.len().min(19)].to_string(),
                                        bytes("unpackedBytes"),
                                        bytes("downloadBytes"),
                                        date_of(i["lastUsed"].as_str().unwrap_or("")),
                                        date_of(i["pulledAt"].as_str().unwrap_or("")),
                                    ]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f if self.name.is_some() => print_structured(&images[0], f)?,
                    f => print_structured(&images, f)?,
                }
            }
            Target::Audit => {
                let entries = c.audit(self.limit.unwrap_or(100)).await?;
                match self.output {
                    Format::Table => print!(
                        "{}",
                        table(
                            &["AT", "WHO", "METHOD", "PATH", "STATUS"],
                            &entries
                                .iter()
                                .map(|e| {
                                    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
                                    vec![
                                        date_of(e["at"].as_str().unwrap_or("")),
                                        s("who"),
                                        s("method"),
                                        s("path"),
                                        e["status"].to_string(),
                                    ]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f => print_structured(&entries, f)?,
                }
            }
            Target::JobExecutions => match self.name {
                Some(uuid) => {
                    let j = c.get_job(&uuid).await?;
                    match self.output {
                        Format::Table => print!("{}", jobs_table(std::slice::from_ref(&j))),
                        f => print_structured(&j.to_resource(), f)?,
                    }
                }
                None => {
                    let jobs = c.list_jobs(self.template.as_deref()).await?;
                    match self.output {
                        Format::Table => print!("{}", jobs_table(&jobs)),
                        f => print_structured(&resources(&jobs, JobExecution::to_resource), f)?,
                    }
                }
            },
            Target::Runs => match self.name {
                Some(id) => {
                    let r = c.get_run(&id).await?;
                    match self.output {
                        Format::Table => print!("{}", runs_table(std::slice::from_ref(&r))),
                        f => print_structured(&r.to_resource(), f)?,
                    }
                }
                None => {
                    let limit = self.limit.unwrap_or(100);
                    let q = RunQuery {
                        function: self.function,
                        status: self.status,
                        limit: Some(limit),
                        after: self.after,
                        since: self.since,
                        until: self.until,
                    };
                    let runs = c.list_runs(&q).await?;
                    match self.output {
                        Format::Table => {
                            print!("{}", runs_table(&runs));
                            if runs.len() == limit
                                && let Some(last) = runs.last()
                            {
                                eprintln!("(more: dispatch get runs --after {} …)", last.id);
                            }
                        }
                        f => print_structured(&resources(&runs, Run::to_resource), f)?,
                    }
                }
            },
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Under one function's table: its async queue against its bound and the 429s since start.
pub(crate) fn print_queue(q: &dispatch_core::run::FunctionQueue) {
    let r = &q.refused;
    println!(
        "\nasync queue: {} of {} (maxQueued), {} running",
        q.queued, q.max_queued, q.running
    );
    println!(
        "refused with 429 since the server started: {} at maxQueued, {} at the namespace's \
         depth, {} at its queued bytes, {} sync calls with every worker busy",
        r.function_full, r.namespace_full, r.namespace_bytes_full, r.workers_busy
    );
}

pub(crate) fn print_deliveries(d: &dispatch_core::events::DeliveryStats) {
    println!(
        "\ndeliveries: {} pending{}, {} dead (dispatch redeliver subscription NAME)",
        d.pending,
        d.oldest_pending_seconds
            .map(|s| format!(" (oldest {s:.0}s)"))
            .unwrap_or_default(),
        d.dead
    );
    println!(
        "since the server started: {} queued, {} tries refused by a full queue",
        d.queued, d.retried
    );
}

/// An event's deliveries in a cell: "2 queued, 1 pending", or "unmatched".
fn deliveries_cell(matched: &serde_json::Value) -> String {
    let all = matched.as_array().map(Vec::as_slice).unwrap_or_default();
    if all.is_empty() {
        return "unmatched".into();
    }
    ["queued", "pending", "dead"]
        .iter()
        .filter_map(|state| {
            let n = all
                .iter()
                .filter(|d| d["state"].as_str().unwrap_or("queued") == *state)
                .count();
            (n > 0).then(|| format!("{n} {state}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An RFC 3339 time from the API in the tables' one format (`Sat Dec  5 09:04:14 UTC 2026`);
/// as it came when it does not parse.
fn date_of(rfc3339: &str) -> String {
    match rfc3339.parse::<jiff::Timestamp>() {
        Ok(t) => crate::output::date(Some(t)),
        Err(_) if rfc3339.is_empty() => "-".into(),
        Err(_) => rfc3339.to_string(),
    }
}

/// `get KIND [NAME] --watch`: the list, then each resource that changes, appears or goes
/// (polled every second; the API has no watch stream), until interrupted.
async fn watch(
    c: &dispatch_client::Client,
    kind: dispatch_core::Kind,
    name: Option<&str>,
    selector: Option<&str>,
    output: Format,
) -> Result<ExitCode> {
    use std::collections::BTreeMap;
    let list = || async {
        let mut items = c.list_selected(kind, selector).await?;
        if let Some(n) = name {
            items.retain(|o| o.name() == n);
        }
        anyhow::Ok(items)
    };
    let show = |items: &[dispatch_core::Object]| -> Result<()> {
        match output {
            Format::Table => {
                crate::output::write_stdout(objects_table(kind, items).as_bytes())?;
            }
            f => {
                for o in items {
                    print_structured(o, f)?;
                }
            }
        }
        Ok(())
    };
    let key = |o: &dispatch_core::Object| serde_json::to_string(o).unwrap_or_default();
    let first = list().await?;
    show(&first)?;
    // After the first table, rows only.
    crate::output::set_no_headers(true);
    let mut seen: BTreeMap<String, String> = first
        .iter()
        .map(|o| (o.name().to_string(), key(o)))
        .collect();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = list().await?;
        let changed: Vec<dispatch_core::Object> = now
            .iter()
            .filter(|o| seen.get(o.name()) != Some(&key(o)))
            .cloned()
            .collect();
        if !changed.is_empty() {
            show(&changed)?;
        }
        let names: std::collections::BTreeSet<&str> = now.iter().map(|o| o.name()).collect();
        for gone in seen.keys().filter(|n| !names.contains(n.as_str())) {
            println!("{}/{gone} deleted", kind.cli_name());
        }
        seen = now.iter().map(|o| (o.name().to_string(), key(o))).collect();
    }
}

/// Records (runs, job executions) in the shape resources print in (`views.rs` of the core).
fn resources<T>(records: &[T], view: fn(&T) -> serde_json::Value) -> Vec<serde_json::Value> {
    records.iter().map(view).collect()
}
