//! How the CLI prints: tables like Dispatch's (`NAME | IMAGE | STATUS | CREATED DATE`) or
//! `-o json|yaml` (an object for one resource, an array for a list).

use std::io::Write;

use anyhow::{Context as _, Result};
use dispatch_core::{JobExecution, Kind, Object, Run};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
    /// `kind/name` lines (resources; `run/ID`, `jobexecution/UUID`, `event/ID`), for scripts
    Name,
    /// Resources: the table with AGE, REASON, DIGEST and LABELS too
    Wide,
    /// `-o jsonpath=TEMPLATE` (`dispatch get` only; the template is [`set_jsonpath`]'s)
    #[value(skip)]
    JsonPath,
}

/// The template of `-o jsonpath=…` (one per process: the CLI prints once).
static JSONPATH: std::sync::OnceLock<crate::jsonpath::Template> = std::sync::OnceLock::new();

/// `-o` of `dispatch get`: a [`Format`] name, or `jsonpath=TEMPLATE` (kubectl's form).
pub fn parse_get_format(s: &str) -> std::result::Result<Format, String> {
    if let Some(template) = s.strip_prefix("jsonpath=") {
        let t = crate::jsonpath::Template::parse(template).map_err(|e| e.to_string())?;
        let _ = JSONPATH.set(t);
        return Ok(Format::JsonPath);
    }
    if s == "jsonpath" {
        return Err("jsonpath needs a template: -o jsonpath='{.items[*].metadata.name}'".into());
    }
    <Format as clap::ValueEnum>::from_str(s, true).map_err(|_| {
        format!(
            "{s:?} is not an output format: use table, wide, json, yaml, name or jsonpath=TEMPLATE"
        )
    })
}

/// Tables without their header and rule (`--no-headers`), for scripts.
static NO_HEADERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_no_headers(on: bool) {
    NO_HEADERS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `kind/name` of one printed value: a resource (`function/hello`), a run (`run/ID`), a job
/// execution (`jobexecution/UUID`), an event (`event/ID`), else its `name`.
fn name_of(v: &serde_json::Value) -> Option<String> {
    let str_at = |p: &str| v.pointer(p).and_then(|x| x.as_str());
    if let (Some(kind), Some(name)) = (str_at("/kind"), str_at("/metadata/name")) {
        let kind = serde_json::from_value::<Kind>(kind.into())
            .map(|k| k.cli_name().to_string())
            .unwrap_or_else(|_| kind.to_ascii_lowercase());
        return Some(format!("{kind}/{name}"));
    }
    if let Some(uuid) = str_at("/uuid") {
        return Some(format!("jobexecution/{uuid}"));
    }
    if let (Some(id), Some(_)) = (str_at("/id"), str_at("/function")) {
        return Some(format!("run/{id}"));
    }
    if let (Some(id), Some(_)) = (str_at("/id"), str_at("/type")) {
        return Some(format!("event/{id}"));
    }
    str_at("/name").map(str::to_string)
}

/// What `create`, `apply` and `version` print: by default a line for people
/// (`function/hello created`); `-o json|yaml` the objects as the server answered them (one
/// object for one, an array for several); `-o name` `kind/name` lines for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Done {
    Json,
    Yaml,
    Name,
}

/// Collects what a command did and prints it in the chosen form: lines as they happen, or
/// the structured forms once at the end ([`Report::finish`]).
pub struct Report {
    format: Option<Done>,
    items: Vec<serde_json::Value>,
}

impl Report {
    pub fn new(format: Option<Done>) -> Report {
        Report {
            format,
            items: Vec::new(),
        }
    }

    /// One thing done: `kind/name verb` for people, `kind/name` for `-o name`, `value` for
    /// the structured forms.
    pub fn done(&mut self, kind: &str, name: &str, verb: &str, value: serde_json::Value) {
        match self.format {
            None => println!("{kind}/{name} {verb}"),
            Some(Done::Name) => println!("{kind}/{name}"),
            Some(_) => self.items.push(value),
        }
    }

    /// Prints the structured forms (nothing for the line forms).
    pub fn finish(mut self) -> Result<()> {
        let format = match self.format {
            Some(Done::Json) => Format::Json,
            Some(Done::Yaml) => Format::Yaml,
            _ => return Ok(()),
        };
        if self.items.len() == 1 {
            print_structured(&self.items.remove(0), format)
        } else {
            print_structured(&self.items, format)
        }
    }

    /// Whether the command prints for people (so it may add lines of its own).
    pub fn for_people(&self) -> bool {
        self.format.is_none()
    }
}

/// Prints `value` as pretty JSON or YAML, or (`-o name`) its items' `kind/name`.
pub fn print_structured<T: Serialize>(value: &T, format: Format) -> Result<()> {
    if format == Format::Wide {
        anyhow::bail!("-o wide is for tables of resources (dispatch get functions -o wide)");
    }
    if format == Format::JsonPath {
        let v = match serde_json::to_value(value).context("failed to encode")? {
            serde_json::Value::Array(items) => {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
            }
            one => one,
        };
        let Some(template) = JSONPATH.get() else {
            anyhow::bail!("-o jsonpath needs a template: -o jsonpath='{{.metadata.name}}'");
        };
        return write_stdout(template.render(&v)?.as_bytes());
    }
    if format == Format::Name {
        let v = serde_json::to_value(value).context("failed to encode")?;
        let items = match v {
            serde_json::Value::Array(a) => a,
            one => vec![one],
        };
        let mut text = String::new();
        for item in &items {
            let Some(name) = name_of(item) else {
                anyhow::bail!(
                    "-o name is for resources, runs, job executions and events: use -o json"
                );
            };
            text.push_str(&name);
            text.push('\n');
        }
        return write_stdout(text.as_bytes());
    }
    let text = match format {
        Format::Yaml => serde_saphyr::to_string(value).context("failed to encode YAML")?,
        _ => serde_json::to_string_pretty(value).context("failed to encode JSON")? + "\n",
    };
    write_stdout(text.as_bytes())
}

/// Writes to stdout; a reader that closed the pipe early (`| head -1`) is not an error.
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Output cut short by its reader (`dispatch get runs | head`) ends the command quietly, as
/// Unix tools do, instead of panicking in `println!`: a panic hook that recognises the
/// standard library's "failed printing to stdout: Broken pipe" and exits 0. Every other
/// panic goes to the default hook.
pub fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// A table in Dispatch's layout: centred headers, ` | ` between columns, a dashed rule.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let s: Vec<String> = cells.into_iter().map(|c| format!(" {c} ")).collect();
        s.join("|").trim_end().to_string() + "\n"
    };
    let mut out = String::new();
    let headed = !NO_HEADERS.load(std::sync::atomic::Ordering::Relaxed);
    if headed {
        out += &line(
            headers
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let pad = widths[i] - h.chars().count();
                    format!("{}{h}{}", " ".repeat(pad / 2), " ".repeat(pad - pad / 2))
                })
                .collect(),
        );
        let total: usize = widths.iter().map(|w| w + 2).sum::<usize>() + n.saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
    }
    for r in rows {
        out.push_str(&line(
            (0..n)
                .map(|i| {
                    let c = r.get(i).map(String::as_str).unwrap_or("");
                    format!("{c:<w$}", w = widths[i])
                })
                .collect(),
        ));
    }
    out
}

/// `Tue Sep 25 16:51:35 PDT 2018` in the local time zone (Dispatch's CREATED DATE).
pub fn date(ts: Option<jiff::Timestamp>) -> String {
    match ts {
        Some(t) => t
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime("%a %b %e %H:%M:%S %Z %Y")
            .to_string(),
        None => "-".into(),
    }
}

fn s(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// `key=value` of each label.
pub fn labels(o: &Object) -> Vec<String> {
    o.metadata
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// The phase, INITIALIZED before the controller has set one.
pub fn phase(o: &Object) -> String {
    o.phase()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "INITIALIZED".into())
}

/// The table of resources of one kind.
pub fn objects_table(kind: Kind, items: &[Object]) -> String {
    objects_table_wide(kind, items, false)
}

/// How long ago: `45s`, `12m`, `3h`, `5d` (kubectl's AGE).
pub fn age(ts: Option<jiff::Timestamp>) -> String {
    let Some(t) = ts else {
        return "-".into();
    };
    let secs = jiff::Timestamp::now().duration_since(t).as_secs().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A digest as tables show it: its first 12 hex digits.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

/// [`objects_table`], and with `wide` (`-o wide`) four more columns for every kind: AGE,
/// REASON, DIGEST (short) and LABELS.
pub fn objects_table_wide(kind: Kind, items: &[Object], wide: bool) -> String {
    // Every branch below lists `items` in order, a row each: the wide cells go on the end.
    let table = |headers: &[&str], rows: &[Vec<String>]| -> String {
        if !wide {
            return table(headers, rows);
        }
        let mut h = headers.to_vec();
        h.extend(["AGE", "REASON", "DIGEST", "LABELS"]);
        let rows: Vec<Vec<String>> = rows
            .iter()
            .zip(items)
            .map(|(r, o)| {
                let mut r = r.clone();
                r.extend([
                    age(o.metadata.created_at),
                    o.status.reason.clone(),
                    short_digest(o.status.digest.as_deref().unwrap_or("-")),
                    labels(o).join(","),
                ]);
                r
            })
            .collect();
        table(&h, &rows)
    };
    let created = |o: &Object| date(o.metadata.created_at);
    match kind {
        Kind::BaseImage => {
            // The embedded backend says in the status that it runs the host's interpreter
            // (the image is for Kubernetes): a NOTE column when any base image has one.
            let noted = items.iter().any(|o| !o.status.reason.is_empty());
            let mut headers = vec!["NAME", "IMAGE", "LANGUAGE", "STATUS", "CREATED DATE"];
            if noted {
                headers.push("NOTE");
            }
            table(
                &headers,
                &items
                    .iter()
                    .map(|o| {
                        let mut row = vec![
                            o.name().into(),
                            s(&o.spec, "image"),
                            s(&o.spec, "language"),
                            phase(o),
                            created(o),
                        ];
                        if noted {
                            row.push(o.status.reason.clone());
                        }
                        row
                    })
                    .collect::<Vec<_>>(),
            )
        }
        Kind::Alias => table(
            &["NAME", "FUNCTION", "ALIAS", "TRAFFIC", "STATUS", "NOTE"],
            &items
                .iter()
                .map(|o| {
                    let spec = o.typed_spec::<dispatch_core::versions::AliasSpec>().ok();
                    let traffic = spec
                        .as_ref()
                        .map(|s| {
                            s.traffic
                                .iter()
                                .map(|t| format!("{}={}%", t.version, t.percent))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let alias = o.name().split_once('.').map(|(_, a)| a).unwrap_or_default();
                    vec![
                        o.name().into(),
                        s(&o.spec, "function"),
                        alias.into(),
                        traffic,
                        phase(o),
                        o.status.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Kind::Image => table(
            &["NAME", "BASEIMAGE", "STATUS", "CREATED DATE"],
            &items
                .iter()
                .map(|o| {
                    vec![
                        o.name().into(),
                        s(&o.spec, "baseImage"),
                        phase(o),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Kind::Function => table(
            &["NAME", "IMAGE", "STATUS", "CREATED DATE"],
            &items
                .iter()
                .map(|o| vec![o.name().into(), s(&o.spec, "image"), phase(o), created(o)])
                .collect::<Vec<_>>(),
        ),
        Kind::JobTemplate => table(
            &["NAME", "IMAGES", "MAX ACTIVE", "STATUS", "CREATED DATE"],
            &items
                .iter()
                .map(|o| {
                    let spec = o.typed_spec::<dispatch_core::JobTemplateSpec>().ok();
                    let images = o
                        .spec
                        .pointer("/jobTemplate/spec/template/spec/containers")
                        .and_then(|c| c.as_array())
                        .map(|cs| {
                            cs.iter()
                                .filter_map(|c| c.get("image").and_then(|i| i.as_str()))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        o.name().into(),
                        images,
                        spec.map(|s| s.max_active().to_string()).unwrap_or_default(),
                        phase(o),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Kind::Subscription => table(
            &[
                "NAME",
                "EVENT TYPE",
                "SOURCE",
                "FUNCTION",
                "STATUS",
                "CREATED DATE",
            ],
            &items
                .iter()
                .map(|o| {
                    let src = s(&o.spec, "source");
                    vec![
                        o.name().into(),
                        s(&o.spec, "eventType"),
                        if src.is_empty() { "*".into() } else { src },
                        s(&o.spec, "function"),
                        phase(o),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Kind::EventDriver => table(
            &[
                "NAME",
                "TYPE",
                "SCHEDULE/PATH",
                "EMITS/RUNS",
                "NEXT FIRE",
                "STATUS",
            ],
            &items
                .iter()
                .map(|o| {
                    let what = match (s(&o.spec, "schedule"), s(&o.spec, "path")) {
                        (sch, _) if !sch.is_empty() => sch,
                        (_, p) => p,
                    };
                    let target = match (s(&o.spec, "eventType"), s(&o.spec, "function")) {
                        (t, _) if !t.is_empty() => format!("event {t}"),
                        (_, f) => format!("function {f}"),
                    };
                    vec![
                        o.name().into(),
                        s(&o.spec, "type"),
                        what,
                        target,
                        date(o.status.next_fire),
                        phase(o),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Kind::Secret => table(
            &["NAME", "KEYS", "CREATED DATE"],
            &items
                .iter()
                .map(|o| vec![o.name().into(), s(&o.spec, "keys"), created(o)])
                .collect::<Vec<_>>(),
        ),
        Kind::Endpoint => table(
            &[
                "NAME",
                "FUNCTION",
                "METHODS",
                "PATHS",
                "HOSTS",
                "STATUS",
                "CREATED DATE",
            ],
            &items
                .iter()
                .map(|o| {
                    let hosts = s(&o.spec, "hosts");
                    // A WebSocket endpoint says so where its method (GET) is shown.
                    let methods = match (o.spec["protocol"].as_str(), o.spec["session"].as_bool()) {
                        (Some("websocket"), Some(true)) => "GET (websocket session)".to_string(),
                        (Some("websocket"), _) => "GET (websocket)".to_string(),
                        _ => s(&o.spec, "methods"),
                    };
                    vec![
                        o.name().into(),
                        s(&o.spec, "function"),
                        methods,
                        s(&o.spec, "paths"),
                        if hosts.is_empty() { "*".into() } else { hosts },
                        phase(o),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn jobs_table(jobs: &[JobExecution]) -> String {
    table(
        &[
            "UUID",
            "TEMPLATE",
            "PHASE",
            "ATTEMPTS",
            "EXIT",
            "CREATED DATE",
        ],
        &jobs
            .iter()
            .map(|j| {
                vec![
                    j.uuid.clone(),
                    j.name.clone(),
                    j.phase.to_string(),
                    j.attempts.to_string(),
                    j.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    date(Some(j.created_at)),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

pub fn runs_table(runs: &[Run]) -> String {
    table(
        &[
            "ID",
            "FUNCTION",
            "STATUS",
            "TRIGGER",
            "COLD",
            "DURATION",
            "CREATED DATE",
        ],
        &runs
            .iter()
            .map(|r| {
                let trigger = serde_json::to_value(r.trigger)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                vec![
                    r.id.clone(),
                    r.function.clone(),
                    r.status.to_string(),
                    trigger,
                    cold_cell(r),
                    format!(
                        "{}ms",
                        r.timings.queued_ms + r.timings.cold_start_ms + r.timings.exec_ms
                    ),
                    date(Some(r.created_at)),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

/// "no" for a warm run; for a cold one how its worker started and what that cost
/// ("fork 3.1ms"), or "yes" when the record has no split (older records).
fn cold_cell(r: &Run) -> String {
    match (r.cold, r.cold_start) {
        (false, _) => "no".into(),
        (true, Some(c)) => format!("{} {:.1}ms", c.method.as_str(), c.total_ms),
        (true, None) => "yes".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout_matches_dispatch() {
        let t = table(&["NAME", "STATUS"], &[vec!["hello".into(), "READY".into()]]);
        assert_eq!(t, " NAME  | STATUS\n----------------\n hello | READY\n");
    }

    #[test]
    fn cold_column_names_the_start_method() {
        let mut r: Run = serde_json::from_value(serde_json::json!({
            "id": "r1", "namespace": "default", "function": "hello", "status": "SUCCEEDED",
            "trigger": "exec", "input": null, "attempts": 1, "cold": false,
            "createdAt": "2026-11-23T08:00:00Z"
        }))
        .unwrap();
        assert_eq!(cold_cell(&r), "no");
        r.cold = true;
        assert_eq!(cold_cell(&r), "yes");
        r.cold_start = Some(dispatch_core::ColdStart {
            method: dispatch_core::StartMethod::Fork,
            total_ms: 3.06,
            ..Default::default()
        });
        assert_eq!(cold_cell(&r), "fork 3.1ms");
        assert!(runs_table(&[r]).contains("fork 3.1ms"));
    }
}
