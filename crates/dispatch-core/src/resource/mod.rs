//! The resource model (DESIGN §3): every resource has the Kubernetes shape
//! `apiVersion/kind/metadata/spec/status`, in the store, on the wire and in manifests.
//!
//! [`Object`] keeps `spec` as JSON so that the store and the API treat every kind alike;
//! [`Object::validate`] parses it into the kind's typed spec (`deny_unknown_fields`, so a typo
//! is an error, not a silently ignored field) and checks it.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ValidationError;
use crate::names::validate_name;

/// The apiVersion of every Dispatch resource.
pub const API_VERSION: &str = "dispatch.dev/v1";

/// apiVersion of dispatcher's JobTemplate, accepted as is.
pub const DISPATCHER_API_VERSION: &str = "dispatcher.ivan.vc/v1alpha1";

/// Every kind of resource (DESIGN §3): what the API, the CLI, manifests and the Kubernetes
/// CRDs (one per kind) name. A new kind goes here, in [`Kind::ALL`] and in its spec type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    BaseImage,
    Image,
    Function,
    Endpoint,
    JobTemplate,
    Secret,
    Subscription,
    EventDriver,
    /// A named pointer to versions of a function (`hello@prod`), stored as `hello.prod`.
    Alias,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::BaseImage,
        Kind::Image,
        Kind::Function,
        Kind::Endpoint,
        Kind::JobTemplate,
        Kind::Secret,
        Kind::Subscription,
        Kind::EventDriver,
        Kind::Alias,
    ];

    /// The plural lower-case form used in API paths (`/v1/namespaces/{ns}/functions`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::BaseImage => "baseimages",
            Kind::Image => "images",
            Kind::Function => "functions",
            Kind::Endpoint => "endpoints",
            Kind::JobTemplate => "jobtemplates",
            Kind::Secret => "secrets",
            Kind::Subscription => "subscriptions",
            Kind::EventDriver => "eventdrivers",
            Kind::Alias => "aliases",
        }
    }

    /// The CLI spelling (`base-image`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Kind::BaseImage => "base-image",
            Kind::Image => "image",
            Kind::Function => "function",
            Kind::Endpoint => "endpoint",
            Kind::JobTemplate => "jobtemplate",
            Kind::Secret => "secret",
            Kind::Subscription => "subscription",
            Kind::EventDriver => "eventdriver",
            Kind::Alias => "alias",
        }
    }

    /// The spelling in messages (`base image`).
    pub fn human(self) -> &'static str {
        match self {
            Kind::BaseImage => "base image",
            Kind::Image => "image",
            Kind::Function => "function",
            Kind::Endpoint => "endpoint",
            Kind::JobTemplate => "job template",
            Kind::Secret => "secret",
            Kind::Subscription => "subscription",
            Kind::EventDriver => "event driver",
            Kind::Alias => "alias",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BaseImage => "BaseImage",
            Kind::Image => "Image",
            Kind::Function => "Function",
            Kind::Endpoint => "Endpoint",
            Kind::JobTemplate => "JobTemplate",
            Kind::Secret => "Secret",
            Kind::Subscription => "Subscription",
            Kind::EventDriver => "EventDriver",
            Kind::Alias => "Alias",
        }
    }

    /// Parses any spelling users write: `Function`, `function`, `functions`, `base-image`,
    /// `base-images`, `baseimage`, `baseimages`; `api`/`apis` (Dispatch's word) for endpoints.
    pub fn parse(s: &str) -> Option<Kind> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        // Dispatch called endpoints APIs.
        if norm == "api" || norm == "apis" {
            return Some(Kind::Endpoint);
        }
        Kind::ALL.into_iter().find(|k| {
            let singular = k.as_str().to_ascii_lowercase();
            norm == singular || norm == k.plural() || norm.strip_suffix('s') == Some(&singular)
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Dispatch's lifecycle states.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    Initialized,
    Creating,
    Ready,
    Error,
    Updating,
    Deleting,
    /// Broker event drivers: subscribed to their broker.
    Connected,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Initialized => "INITIALIZED",
            Phase::Creating => "CREATING",
            Phase::Ready => "READY",
            Phase::Error => "ERROR",
            Phase::Updating => "UPDATING",
            Phase::Deleting => "DELETING",
            Phase::Connected => "CONNECTED",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Who last wrote the spec (the API token's name), set by the server; what a function's
    /// versions say made them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
}

/// What the controller last made of the resource (written by the server, not by users).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Why the phase is what it is: the build step under way, the error that ended a build
    /// in ERROR, or a note on a READY resource.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Content address (`sha256:…`) of the build or settings the phase is about: the same
    /// inputs give the same digest and reuse one build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The `metadata.generation` the controller last acted on: the status describes the
    /// current spec when the two are equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Functions on the Kubernetes backend: the pullable image they run
    /// (`registry/…@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Cron event drivers: when they fire next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub next_fire: Option<Timestamp>,
}

impl Status {
    pub fn phase(phase: Phase) -> Self {
        Status {
            phase: Some(phase),
            ..Status::default()
        }
    }
}

/// One resource of any kind, with its spec as JSON. What the store keeps and the API moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    #[serde(default = "empty_spec")]
    pub spec: serde_json::Value,
    #[serde(default)]
    pub status: Status,
}

fn empty_spec() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Object {
    /// A new object of `kind` named `name` in `namespace` with `spec`.
    pub fn new(kind: Kind, namespace: &str, name: &str, spec: impl Serialize) -> Self {
        Object {
            api_version: API_VERSION.to_string(),
            kind,
            metadata: Metadata {
                name: name.to_string(),
                namespace: Some(namespace.to_string()),
                ..Metadata::default()
            },
            spec: serde_json::to_value(spec).unwrap_or_else(|_| empty_spec()),
            status: Status::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(crate::DEFAULT_NAMESPACE)
    }

    pub fn phase(&self) -> Option<Phase> {
        self.status.phase
    }

    /// The spec parsed as `T`; unknown fields and wrong types are a [`ValidationError`]
    /// that names the kind and the resource.
    pub fn typed_spec<T: DeserializeOwned>(&self) -> Result<T, ValidationError> {
        serde_json::from_value(self.spec.clone()).map_err(|e| {
            ValidationError::new(format!(
                "{} {:?} has an invalid spec: {e}",
                self.kind.human(),
                self.metadata.name
            ))
        })
    }

    /// Validates the name, apiVersion and spec, and writes the spec back in normal form
    /// (defaults filled, methods upper-cased, language inferred): what the API stores.
    pub fn validate(&mut self) -> Result<(), ValidationError> {
        let dispatcher =
            self.kind == Kind::JobTemplate && self.api_version == DISPATCHER_API_VERSION;
        if self.api_version != API_VERSION && !dispatcher {
            return Err(ValidationError::new(format!(
                "apiVersion {:?} is not supported for kind {}: use {API_VERSION}",
                self.api_version, self.kind
            )));
        }
        if self.kind == Kind::Alias {
            crate::versions::AliasSpec::split_name(&self.metadata.name)?;
        } else {
            validate_name(self.kind.human(), &self.metadata.name)?;
        }
        if let Some(ns) = &self.metadata.namespace {
            validate_name("namespace", ns)?;
        }
        let spec = match self.kind {
            Kind::BaseImage => normal(self.typed_spec::<BaseImageSpec>()?.normalize(self)?),
            Kind::Image => normal(self.typed_spec::<ImageSpec>()?.normalize()?),
            Kind::Function => normal(self.typed_spec::<FunctionSpec>()?.normalize()?),
            Kind::Endpoint => normal(self.typed_spec::<EndpointSpec>()?.normalize()?),
            Kind::Secret => normal(self.typed_spec::<SecretSpec>()?.normalize()?),
            Kind::Subscription => normal(
                self.typed_spec::<crate::events::SubscriptionSpec>()?
                    .normalize()?,
            ),
            Kind::EventDriver => normal(
                self.typed_spec::<crate::events::EventDriverSpec>()?
                    .normalize()?,
            ),
            Kind::Alias => normal(
                self.typed_spec::<crate::versions::AliasSpec>()?
                    .normalize(&self.metadata.name)?,
            ),
            Kind::JobTemplate => {
                let spec: crate::jobs::JobTemplateSpec = self.typed_spec()?;
                spec.validate()?;
                // Kept verbatim: the Kubernetes backend creates Jobs from it as written.
                self.spec.clone()
            }
        };
        self.spec = spec;
        Ok(())
    }
}

fn normal(spec: impl Serialize) -> serde_json::Value {
    serde_json::to_value(spec).unwrap_or_else(|_| empty_spec())
}

mod endpoint;
mod function;
mod images;
mod secret;
#[cfg(test)]
mod tests;

pub use endpoint::*;
pub use function::*;
pub use images::*;
pub use secret::*;
