//! Manifests: multi-document YAML or JSON files of resources (`dispatch apply -f`).

use serde_json::Value;

use crate::ValidationError;
use crate::resource::{API_VERSION, Kind, Object};

pub use crate::resource::DISPATCHER_API_VERSION;

/// One document of a manifest: the object plus the raw document, so that the CLI can read
/// client-side fields (`spec.sourcePath`) before it sends the object.
#[derive(Debug, Clone)]
pub struct Document {
    pub object: Object,
    /// 1-based position of the document in the file, for messages.
    pub index: usize,
}

impl Document {
    /// Where a message about it points: `document 2 (function hello)`.
    pub fn label(&self) -> String {
        format!(
            "document {} ({} {})",
            self.index,
            self.object.kind.human(),
            self.object.name()
        )
    }
}

/// A dispatcher `JobExecution` document: start job template `template` with `payload`, as an
/// execution named `name` (what `dispatch apply -f` does with one; dispatcher's
/// `spec.jobTemplateName` and `spec.payload`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionDoc {
    pub name: String,
    pub namespace: Option<String>,
    pub template: String,
    /// `spec.payload` as text (a YAML mapping or list is written as its JSON).
    pub payload: String,
    pub index: usize,
}

/// One document of a manifest: a resource, or a job execution to start.
#[derive(Debug, Clone)]
pub enum Entry {
    Resource(Box<Document>),
    Execution(ExecutionDoc),
}

/// Parses a YAML (multi-document, `---`) or JSON (one object, or an array of objects)
/// manifest into resources only: a `JobExecution` is refused here (`dispatch apply -f`
/// starts one; see [`parse_entries`]).
pub fn parse_manifest(text: &str) -> Result<Vec<Document>, ValidationError> {
    parse_entries(text)?
        .into_iter()
        .map(|e| match e {
            Entry::Resource(d) => Ok(*d),
            Entry::Execution(x) => Err(ValidationError::new(format!(
                "document {}: a JobExecution is started by `dispatch apply -f` (or PUT \
                 /execute/{{namespace}}/{{name}}), not by this command",
                x.index
            ))),
        })
        .collect()
}

/// Parses a manifest (as [`parse_manifest`]) into resources and job executions, in order.
pub fn parse_entries(text: &str) -> Result<Vec<Entry>, ValidationError> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(trimmed)
            .map_err(|e| ValidationError::new(format!("manifest is not valid JSON: {e}")))?
        {
            Value::Array(items) => items,
            v => vec![v],
        }
    } else {
        serde_saphyr::from_multiple::<Value>(text)
            .map_err(|e| ValidationError::new(format!("manifest is not valid YAML: {e}")))?
    };
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let index = i + 1;
        if doc.is_null() {
            continue;
        }
        if doc.get("kind").and_then(Value::as_str) == Some("JobExecution") {
            out.push(Entry::Execution(execution_doc(&doc, index)?));
            continue;
        }
        out.push(Entry::Resource(Box::new(Document {
            object: document_to_object(doc, index)?,
            index,
        })));
    }
    if out.is_empty() {
        return Err(ValidationError::new("manifest has no documents"));
    }
    Ok(out)
}

fn execution_doc(doc: &Value, index: usize) -> Result<ExecutionDoc, ValidationError> {
    let mut x = ExecutionDoc::from_value(doc)
        .map_err(|e| ValidationError::new(format!("document {index}: {}", e.message)))?;
    x.index = index;
    Ok(x)
}

impl ExecutionDoc {
    /// Reads a `JobExecution` resource (dispatcher's apiVersion, or ours): `metadata.name`,
    /// `spec.jobTemplateName`, `spec.payload`.
    pub fn from_value(doc: &Value) -> Result<ExecutionDoc, ValidationError> {
        let at = ValidationError::new;
        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api_version != DISPATCHER_API_VERSION && api_version != API_VERSION {
            return Err(at(format!(
                "apiVersion {api_version:?} of a JobExecution is not supported: use \
                 {DISPATCHER_API_VERSION}"
            )));
        }
        let str_at = |p: &str| doc.pointer(p).and_then(Value::as_str).map(str::to_string);
        let name = str_at("/metadata/name").unwrap_or_default();
        crate::names::validate_name("job execution", &name)?;
        let Some(template) = str_at("/spec/jobTemplateName").filter(|t| !t.is_empty()) else {
            return Err(at(format!(
                "JobExecution {name:?} has no spec.jobTemplateName: name the job template to run"
            )));
        };
        let payload = match doc.pointer("/spec/payload") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        Ok(ExecutionDoc {
            name,
            namespace: str_at("/metadata/namespace"),
            template,
            payload,
            index: 1,
        })
    }

    /// The `JobExecution` resource that [`ExecutionDoc::from_value`] reads, in namespace `ns`.
    pub fn to_resource(&self, ns: &str) -> Value {
        serde_json::json!({
            "apiVersion": DISPATCHER_API_VERSION,
            "kind": "JobExecution",
            "metadata": {"name": self.name, "namespace": ns},
            "spec": {"jobTemplateName": self.template, "payload": self.payload},
        })
    }
}

fn document_to_object(doc: Value, index: usize) -> Result<Object, ValidationError> {
    let at = |msg: String| ValidationError::new(format!("document {index}: {msg}"));
    let Value::Object(map) = &doc else {
        return Err(at(
            "is not a mapping with apiVersion, kind, metadata and spec".into(),
        ));
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind_str = map.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind_str.is_empty() {
        return Err(at("has no kind".into()));
    }
    if api_version == DISPATCHER_API_VERSION && kind_str != "JobTemplate" {
        return Err(at(format!(
            "kind {kind_str} of {DISPATCHER_API_VERSION} is not supported: only JobTemplate and \
             JobExecution are"
        )));
    }
    if api_version != API_VERSION && api_version != DISPATCHER_API_VERSION {
        return Err(at(format!(
            "apiVersion {api_version:?} is not supported: use {API_VERSION}"
        )));
    }
    let Some(kind) = Kind::parse(kind_str).filter(|k| k.as_str() == kind_str) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Err(at(format!(
            "kind {kind_str:?} is not known: use one of {}",
            known.join(", ")
        )));
    };
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        return Err(at(format!("{kind} has no metadata.name")));
    }
    let obj: Object = serde_json::from_value(doc.clone())
        .map_err(|e| at(format!("{kind} {name:?} is not valid: {e}")))?;
    debug_assert_eq!(obj.kind, kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml() {
        let docs = parse_manifest(
            "apiVersion: dispatch.dev/v1\nkind: Image\nmetadata:\n  name: python3\nspec:\n  baseImage: python3\n---\n---\napiVersion: dispatch.dev/v1\nkind: Endpoint\nmetadata: {name: e}\nspec: {function: hello, paths: [/hello]}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].object.kind, Kind::Image);
        assert_eq!(docs[1].object.spec["paths"][0], "/hello");
        assert_eq!(docs[1].index, 2);
    }

    #[test]
    fn parses_json_object_and_array() {
        let one = r#"{"apiVersion":"dispatch.dev/v1","kind":"Image","metadata":{"name":"a"},"spec":{"baseImage":"python3"}}"#;
        assert_eq!(parse_manifest(one).unwrap().len(), 1);
        assert_eq!(parse_manifest(&format!("[{one},{one}]")).unwrap().len(), 2);
    }

    #[test]
    fn errors_name_the_document() {
        let err =
            parse_manifest("apiVersion: dispatch.dev/v1\nkind: Gadget\nmetadata: {name: a}\n")
                .unwrap_err();
        assert!(
            err.message.starts_with("document 1: kind \"Gadget\""),
            "{err}"
        );
        let err = parse_manifest("apiVersion: v1\nkind: Image\nmetadata: {name: a}\n").unwrap_err();
        assert!(err.message.contains("apiVersion"), "{err}");
        let err = parse_manifest("kind: [unclosed").unwrap_err();
        assert!(err.message.contains("not valid YAML"), "{err}");
        let err =
            parse_manifest("apiVersion: dispatch.dev/v1\nkind: Image\nmetadata: {}\n").unwrap_err();
        assert!(err.message.contains("metadata.name"), "{err}");
    }

    #[test]
    fn a_dispatcher_job_execution_is_an_entry_of_its_own() {
        let text = "apiVersion: dispatcher.ivan.vc/v1alpha1\nkind: JobTemplate\nmetadata: {name: t}\nspec:\n  jobTemplate: {spec: {template: {spec: {containers: [{name: c, image: alpine, command: [echo]}], restartPolicy: Never}}}}\n---\napiVersion: dispatcher.ivan.vc/v1alpha1\nkind: JobExecution\nmetadata: {name: run-1}\nspec: {jobTemplateName: t, payload: {n: 1}}\n";
        let entries = parse_entries(text).unwrap();
        assert!(matches!(&entries[0], Entry::Resource(d) if d.object.kind == Kind::JobTemplate));
        let Entry::Execution(x) = &entries[1] else {
            panic!("{entries:?}");
        };
        assert_eq!(
            (
                x.name.as_str(),
                x.template.as_str(),
                x.payload.as_str(),
                x.index
            ),
            ("run-1", "t", r#"{"n":1}"#, 2)
        );
        // What apply sends is what the server reads back.
        let mut sent = ExecutionDoc::from_value(&x.to_resource("team")).unwrap();
        assert_eq!(sent.namespace.take().as_deref(), Some("team"));
        assert_eq!(
            (sent.name, sent.template, sent.payload),
            (x.name.clone(), x.template.clone(), x.payload.clone())
        );
        // Commands that take resources only say which command starts one.
        let e = parse_manifest(text).unwrap_err().message;
        assert!(
            e.contains("document 2") && e.contains("dispatch apply -f"),
            "{e}"
        );
        let e = parse_entries("apiVersion: dispatcher.ivan.vc/v1alpha1\nkind: JobExecution\nmetadata: {name: x}\nspec: {}\n")
            .unwrap_err()
            .message;
        assert!(e.contains("spec.jobTemplateName"), "{e}");
    }
}
