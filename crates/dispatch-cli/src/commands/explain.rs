//! `dispatch explain KIND[.field…]`: what a resource's fields mean, from the same schemas as
//! the CRDs (the core types' doc comments), as `kubectl explain` shows them.

use std::process::ExitCode;

use anyhow::{Result, bail};
use dispatch_core::Kind;
use serde_json::Value;

use crate::output::{Format, print_structured};

/// Describe a resource's fields: dispatch explain function.spec.concurrency
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Prints what a field of a resource means, its type and its fields, from \
the schemas the Kubernetes CRDs are made of (so the same text as kubectl explain). KIND is any \
spelling (function, functions, base-image); a dotted path goes into the fields (arrays and maps \
are entered on their own).\n\nExamples:\n  dispatch explain function\n  dispatch explain \
function.spec.concurrency\n  dispatch explain endpoint.spec.paths -o json\n  dispatch \
explain jobexecution.status"
)]
pub struct Explain {
    /// KIND or KIND.field.path (e.g. function.spec.retry.backoff)
    pub path: String,
    /// Output format: table (text) or json / yaml (the schema itself)
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// The type of a schema node as kubectl writes it: `<string>`, `<[]string>`,
/// `<map[string]string>`, `<object>`.
fn type_of(node: &Value) -> String {
    match node["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&node["items"])),
        Some("object") if node["additionalProperties"].is_object() => {
            format!("map[string]{}", type_of(&node["additionalProperties"]))
        }
        Some(t) => t.to_string(),
        None if node.get("x-kubernetes-preserve-unknown-fields").is_some() => "any".into(),
        None => "object".into(),
    }
}

/// The node whose fields a path goes on into: an array's items, a map's values.
fn inner(node: &Value) -> &Value {
    if node["items"].is_object() {
        inner(&node["items"])
    } else if node["additionalProperties"].is_object() {
        inner(&node["additionalProperties"])
    } else {
        node
    }
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(by)))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Explain {
    pub fn run(self) -> Result<ExitCode> {
        let mut parts = self.path.split('.');
        let kind_name = parts.next().unwrap_or_default();
        // dispatcher's JobExecution has a CRD too (its own group).
        let (kind, version, crd) = if matches!(
            super::parse_target(kind_name),
            Ok(super::Target::JobExecutions)
        ) {
            (
                "JobExecution",
                dispatch_core::resource::DISPATCHER_API_VERSION,
                dispatch_k8s::job_execution_crd(),
            )
        } else {
            let Some(kind) = Kind::parse(kind_name) else {
                let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.cli_name()).collect();
                bail!(
                    "unknown kind {kind_name:?}: explain one of {}, jobexecution",
                    kinds.join(", ")
                );
            };
            let crd = dispatch_k8s::crds()
                .into_iter()
                .find(|c| c.spec.names.kind == kind.as_str())
                .expect("a CRD per kind");
            (kind.as_str(), dispatch_core::API_VERSION, crd)
        };
        let root = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref()),
        )?;
        let mut node = &root;
        let mut field = Vec::new();
        for part in parts {
            let here = inner(node);
            let Some(next) = here["properties"].get(part) else {
                let have: Vec<&str> = here["properties"]
                    .as_object()
                    .map(|m| m.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                bail!(
                    "{} has no field {part:?}{}",
                    if field.is_empty() {
                        kind.to_string()
                    } else {
                        format!("{kind}.{}", field.join("."))
                    },
                    if have.is_empty() {
                        String::new()
                    } else {
                        format!(" (fields: {})", have.join(", "))
                    }
                );
            };
            field.push(part);
            node = next;
        }
        if self.output != Format::Table {
            print_structured(node, self.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut out = format!("KIND:     {kind}\nVERSION:  {version}\n");
        if !field.is_empty() {
            out += &format!("FIELD:    {} <{}>\n", field.join("."), type_of(node));
        }
        let description = node["description"].as_str().unwrap_or(match field.len() {
            0 => "A Dispatch resource: apiVersion, kind, metadata, spec (what you want) and status (what the server made of it).",
            _ => "(no description)",
        });
        out += &format!("\nDESCRIPTION:\n{}\n", indent(description, 5));
        if let Some(values) = node["enum"].as_array() {
            let v: Vec<String> = values
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect();
            out += &format!("\nVALUES:\n{}\n", indent(&v.join(", "), 5));
        }
        let here = inner(node);
        if let Some(props) = here["properties"].as_object() {
            let required: Vec<&str> = here["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out += "\nFIELDS:\n";
            for (name, p) in props {
                let req = if required.contains(&name.as_str()) {
                    " -required-"
                } else {
                    ""
                };
                out += &format!("   {name}\t<{}>{req}\n", type_of(p));
                if let Some(d) = p["description"].as_str() {
                    out += &format!("{}\n\n", indent(d, 5));
                }
            }
        }
        crate::output::write_stdout(out.trim_end().as_bytes())?;
        println!();
        Ok(ExitCode::SUCCESS)
    }
}
