//! The CRDs of every kind: each kind's spec schema (from the core types, made structural the
//! way kube's derive would) under one generic custom-resource shape.

use std::collections::BTreeMap;

use dispatch_core::{FunctionSpec, Kind};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
    CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::*;

fn column(name: &str, type_: &str, path: &str, priority: i32) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.into(),
        type_: type_.into(),
        json_path: path.into(),
        priority: (priority > 0).then_some(priority),
        ..Default::default()
    }
}

/// The OpenAPI v3 schema of `T` as a CRD takes it: inlined and structural (schemars with
/// kube's rewriters, as kube's `CustomResource` derive does), doc comments as descriptions
/// (`kubectl explain`), and fields that hold any JSON (a Job spec to template, system
/// dependencies) kept whole with `x-kubernetes-preserve-unknown-fields`.
pub fn schema_of<T: schemars::JsonSchema>() -> JSONSchemaProps {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .with_transform(kube_core::schema::OptionalEnum)
        .into_generator();
    let mut v =
        serde_json::to_value(generator.into_root_schema_for::<T>()).expect("a schema is JSON");
    if let Some(root) = v.as_object_mut() {
        root.remove("title");
    }
    keep_any_json(&mut v);
    without_design_refs(&mut v);
    serde_json::from_value(v).expect("schemars' OpenAPI schema is a JSONSchemaProps")
}

/// Drops " (DESIGN §n)" from descriptions: doc comments point maintainers at the design,
/// `kubectl explain` readers do not have it.
fn without_design_refs(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(d)) = o.get_mut("description") {
                while let Some(start) = d.find(" (DESIGN §") {
                    let end = d[start..].find(')').map_or(d.len(), |e| start + e + 1);
                    d.replace_range(start..end, "");
                }
            }
            o.values_mut().for_each(without_design_refs);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_design_refs),
        _ => {}
    }
}

/// Marks "anything" subschemas (`true`, or only a description) the way Kubernetes takes
/// them: `x-kubernetes-preserve-unknown-fields`.
fn keep_any_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    const SHAPES: [&str; 8] = [
        "type",
        "properties",
        "items",
        "additionalProperties",
        "enum",
        "anyOf",
        "oneOf",
        "allOf",
    ];
    fn mark(s: &mut Value) {
        if *s == Value::Bool(true) {
            *s = Value::Object(Default::default());
        }
        if let Some(o) = s.as_object_mut()
            && !SHAPES.iter().any(|k| o.contains_key(*k))
        {
            o.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
        }
        keep_any_json(s);
    }
    let Some(o) = v.as_object_mut() else { return };
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        props.values_mut().for_each(mark);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(s) = o.get_mut(key) {
            mark(s);
        }
    }
}

/// The schema of a kind's `spec` as stored (a secret's is sealed: its keys and ciphertext).
pub fn spec_schema(kind: Kind) -> JSONSchemaProps {
    use dispatch_core::events::{EventDriverSpec, SubscriptionSpec};
    use dispatch_core::jobs::JobTemplateSpec;
    use dispatch_core::{BaseImageSpec, EndpointSpec, ImageSpec, SealedSecret};
    match kind {
        Kind::BaseImage => schema_of::<BaseImageSpec>(),
        Kind::Image => schema_of::<ImageSpec>(),
        Kind::Function => schema_of::<FunctionSpec>(),
        Kind::Endpoint => schema_of::<EndpointSpec>(),
        Kind::Secret => schema_of::<SealedSecret>(),
        Kind::JobTemplate => schema_of::<JobTemplateSpec>(),
        Kind::Subscription => schema_of::<SubscriptionSpec>(),
        Kind::EventDriver => schema_of::<EventDriverSpec>(),
        Kind::Alias => schema_of::<dispatch_core::versions::AliasSpec>(),
    }
}

/// One CRD per kind: namespaced, `dispatch.dev/v1`, a status subresource, and a structural
/// schema generated from the core types: the kind's spec and the common status, so that the
/// API server refuses a malformed object (`kubectl apply` of a Function without an image, a
/// base image of an unknown language) and prunes unknown fields.
pub fn crds() -> Vec<CustomResourceDefinition> {
    Kind::ALL
        .iter()
        .map(|k| {
            let plural = k.plural().to_string();
            let schema = JSONSchemaProps {
                type_: Some("object".into()),
                properties: Some(BTreeMap::from([
                    ("spec".to_string(), spec_schema(*k)),
                    ("status".to_string(), schema_of::<dispatch_core::Status>()),
                ])),
                ..Default::default()
            };
            CustomResourceDefinition {
                metadata: ObjectMeta {
                    name: Some(format!("{plural}.{GROUP}")),
                    ..Default::default()
                },
                spec: CustomResourceDefinitionSpec {
                    group: GROUP.into(),
                    names: CustomResourceDefinitionNames {
                        kind: k.as_str().into(),
                        plural: plural.clone(),
                        singular: Some(k.as_str().to_ascii_lowercase()),
                        categories: Some(vec!["dispatch".into()]),
                        ..Default::default()
                    },
                    scope: "Namespaced".into(),
                    versions: vec![CustomResourceDefinitionVersion {
                        name: "v1".into(),
                        served: true,
                        storage: true,
                        // `kubectl get functions` shows what `dispatch get functions` does.
                        additional_printer_columns: Some(vec![
                            column("Phase", "string", ".status.phase", 0),
                            column("Reason", "string", ".status.reason", 1),
                            column("Age", "date", ".metadata.creationTimestamp", 0),
                        ]),
                        schema: Some(CustomResourceValidation {
                            open_api_v3_schema: Some(schema),
                        }),
                        subresources: Some(CustomResourceSubresources {
                            status: Some(CustomResourceSubresourceStatus(
                                serde_json::Value::Object(Default::default()),
                            )),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                status: None,
            }
        })
        .collect()
}

/// The API group and version of dispatcher's `JobExecution` (its documented way to start a
/// job with kubectl).
pub const EXECUTION_GROUP: &str = "dispatcher.ivan.vc";
pub const EXECUTION_VERSION: &str = "v1alpha1";

/// dispatcher's `JobExecution` custom resource, `dispatcher.ivan.vc/v1alpha1`: `kubectl apply`
/// one and the server starts its job template's execution under its name, once, and writes
/// the execution's phase back into its status (dispatcher's `Waiting`, `Active`, `Completed`,
/// `Invalid`, and `Failed`, `Cancelled`), with the Job it runs as and `Complete`/`Failed`
/// conditions (`kubectl wait --for=condition=Complete`). Deleting it stops the execution.
pub fn job_execution_crd() -> CustomResourceDefinition {
    let text = |d: &str| serde_json::json!({"type": "string", "description": d});
    let time =
        |d: &str| serde_json::json!({"type": "string", "format": "date-time", "description": d});
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "description": "The execution to start: a job template of this namespace and its payload.",
                "required": ["jobTemplateName"],
                "properties": {
                    "jobTemplateName": text("The JobTemplate to execute, in this namespace."),
                    "payload": {
                        "description": "What the template renders as {{ .Payload }}: text, or any value (passed as its JSON).",
                        "x-kubernetes-preserve-unknown-fields": true
                    },
                    "uuid": text("Set by dispatcher's HTTP API; not used (the execution is named by metadata.name)."),
                    "timestamp": time("Set by dispatcher's HTTP API; not used (see metadata.creationTimestamp)."),
                }
            },
            "status": {
                "type": "object",
                "description": "The execution as the Dispatch server last recorded it.",
                "properties": {
                    "phase": {
                        "type": "string",
                        "enum": dispatch_core::JobPhase::ALL.map(|p| p.as_str()),
                        "description": "Waiting (for a slot of the template's maxActive), Active (its Job runs), Completed, Failed, Cancelled, or Invalid (its template is missing — it starts when the template is created — or does not render with this payload)."
                    },
                    "reason": text("Why the phase is what it is: the failure, the retry under way, what is missing."),
                    "attempts": {"type": "integer", "description": "Pod attempts started (1 + retries)."},
                    "exitCode": {"type": "integer", "description": "The exit code of the last attempt's container, once it ended."},
                    "startTime": time("When its Job was created."),
                    "completionTime": time("When it ended."),
                    "job": {
                        "type": "object",
                        "description": "The batch/v1 Job it runs as.",
                        "properties": {
                            "apiVersion": text("batch/v1."),
                            "kind": text("Job."),
                            "namespace": text("The Job's namespace (this one)."),
                            "name": text("The Job's name."),
                        }
                    },
                    "conditions": {
                        "type": "array",
                        "description": "Complete or Failed once it ended, as a Job reports them.",
                        "items": {
                            "type": "object",
                            "description": "One condition.",
                            "properties": {
                                "type": text("Complete or Failed."),
                                "status": text("True."),
                                "reason": text("The phase it ended in."),
                                "message": text("Why, when it failed."),
                                "lastTransitionTime": time("When it ended."),
                            }
                        }
                    }
                }
            }
        }
    });
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("jobexecutions.{EXECUTION_GROUP}")),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: EXECUTION_GROUP.into(),
            names: CustomResourceDefinitionNames {
                kind: "JobExecution".into(),
                plural: "jobexecutions".into(),
                singular: Some("jobexecution".into()),
                categories: Some(vec!["dispatch".into()]),
                ..Default::default()
            },
            scope: "Namespaced".into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: EXECUTION_VERSION.into(),
                served: true,
                storage: true,
                additional_printer_columns: Some(vec![
                    column("Template", "string", ".spec.jobTemplateName", 0),
                    column("Phase", "string", ".status.phase", 0),
                    column("Reason", "string", ".status.reason", 1),
                    column("Age", "date", ".metadata.creationTimestamp", 0),
                ]),
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(
                        serde_json::from_value(schema).expect("a JSONSchemaProps"),
                    ),
                }),
                subresources: Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(serde_json::Value::Object(
                        Default::default(),
                    ))),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}
