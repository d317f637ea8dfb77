//! Admission: what a resource must satisfy before it is stored — its spec valid and in
//! normal form, the resources it names there (an image's base image, a function's image and
//! its secrets, an endpoint's function), a function's handler found in its source, the
//! defaults the server decides filled in. Nothing is stored here.

use dispatch_core::versions::AliasSpec;
use dispatch_core::{
    BaseImageSpec, EndpointSpec, FunctionSpec, ImageSpec, Kind, Object, ValidationError,
};
use dispatch_runtime::{handler, source};

use crate::controller::image_plan;
use crate::state::{AppState, StateError};

pub use crate::builtins::{BUILTIN_BASE_IMAGES, builtin_base_image};

/// Why a resource is not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The request does not fit its path (another kind, another namespace).
    #[error("{0}")]
    Misplaced(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A source archive that cannot be read as one.
    #[error("source archive is not valid: {0}")]
    Archive(String),
    /// It names a resource that does not exist.
    #[error("{0}")]
    UnknownReference(String),
    /// Its path or route is another resource's.
    #[error("{0}")]
    RouteConflict(String),
    #[error(
        "base image {0:?} is built in and cannot be changed: create a base image with another name"
    )]
    BuiltIn(String),
    #[error(transparent)]
    State(#[from] StateError),
}

fn unknown(kind: Kind, name: &str, ns: &str, hint: &str) -> AdmitError {
    AdmitError::UnknownReference(format!(
        "{} {name:?} not found in namespace {ns:?}: {hint}",
        kind.human()
    ))
}

/// Validates an object for `ns`/`kind` and fills what the server decides (defaults, the
/// default handler). Nothing is stored here.
pub(crate) async fn admit(
    state: &AppState,
    ns: &str,
    kind: Kind,
    mut obj: Object,
) -> Result<Object, AdmitError> {
    if obj.kind != kind {
        return Err(AdmitError::Misplaced(format!(
            "kind {} does not belong under /{}: send it to /{}",
            obj.kind,
            kind.plural(),
            obj.kind.plural()
        )));
    }
    match &obj.metadata.namespace {
        Some(other) if other != ns => {
            return Err(AdmitError::Misplaced(format!(
                "metadata.namespace {other:?} does not match the namespace in the path {ns:?}"
            )));
        }
        _ => obj.metadata.namespace = Some(ns.to_string()),
    }
    state.require_namespace(ns)?;
    obj.validate()?;
    // An endpoint, a subscription or an event driver names a function that must exist.
    // An endpoint, a subscription or an event driver names a function (and an alias: `hello@prod`)
    // that must exist; `hello@3` a version the function keeps.
    for (k, name) in obj.references() {
        if k == Kind::Function && state.get(ns, k, &name).await?.is_none() {
            return Err(unknown(
                k,
                &name,
                ns,
                "create it first (dispatch create function NAME PATH --image IMAGE)",
            ));
        }
        if k == Kind::Alias && state.get(ns, k, &name).await?.is_none() {
            let (f, a) = dispatch_core::versions::AliasSpec::split_name(&name)?;
            return Err(AdmitError::UnknownReference(format!(
                "function {f:?} has no alias {a:?} in namespace {ns:?}: create it first (dispatch create alias {f} {a} --version N)"
            )));
        }
    }
    if kind != Kind::Alias {
        for (k, name) in obj.references() {
            if k == Kind::Function {
                for v in obj.pinned_versions(&name) {
                    check_kept(state, ns, &name, v).await?;
                }
            }
        }
    }
    match kind {
        // Validated by `Object::validate` (shape and every template parses).
        Kind::JobTemplate => {}
        // Stored sealed: the store never sees a value.
        Kind::Secret => {
            let spec: dispatch_core::SecretSpec = obj.typed_spec()?;
            let sealed = state
                .secrets
                .seal(ns, obj.name(), &spec.data)
                .map_err(|e| StateError::internal("sealing a secret", e))?;
            obj.spec = serde_json::to_value(sealed)
                .map_err(|e| StateError::internal("sealing a secret", e))?;
        }
        Kind::BaseImage => {
            if builtin_base_image(ns, obj.name()).is_some() {
                return Err(builtin(obj.name()));
            }
        }
        Kind::Image => {
            let spec: ImageSpec = obj.typed_spec()?;
            let (base, base_spec) = base_image(state, ns, &spec.base_image).await?;
            let (_, build) = image_plan(&spec, &base, &base_spec)?;
            state.backend.validate_image(&build)?;
        }
        Kind::Function => {
            let spec: FunctionSpec = obj.typed_spec()?;
            let Some(image) = state.get(ns, Kind::Image, &spec.image).await? else {
                return Err(unknown(
                    Kind::Image,
                    &spec.image,
                    ns,
                    "create it first (dispatch create image NAME BASE-IMAGE)",
                ));
            };
            let image: ImageSpec = image.typed_spec()?;
            let base = base_image_spec(state, ns, &image.base_image).await?;
            let source = spec.source.clone().unwrap_or_default();
            let archive = state
                .blob(&source)
                .await
                .map_err(|e| AdmitError::Archive(e.to_string()))?;
            let files = match archive {
                None => None,
                Some(archive) => Some(
                    tokio::task::spawn_blocking(move || source::inspect(&archive))
                        .await
                        .map_err(|e| StateError::internal("inspecting a source archive", e))?
                        .map_err(|e| AdmitError::Archive(e.to_string()))?,
                ),
            };
            let Some(files) = files else {
                return Err(AdmitError::UnknownReference(format!(
                    "source {} was not uploaded: POST the archive to /v1/namespaces/{ns}/functions/{}/source first",
                    spec.source.unwrap_or_default(),
                    obj.name()
                )));
            };
            let resolved = handler::resolve(base.lang(), spec.handler.as_deref(), &files)?;
            if let Some(m) = obj.spec.as_object_mut() {
                m.insert("handler".into(), resolved.handler.into());
            }
        }
        Kind::Subscription => {}
        Kind::EventDriver => {
            let spec: dispatch_core::events::EventDriverSpec = obj.typed_spec()?;
            if let Some(p) = &spec.path
                && let Some((ons, oname, _)) = state.event_index().webhooks.get(p)
                && (ons.as_str(), oname.as_str()) != (ns, obj.name())
            {
                return Err(AdmitError::RouteConflict(format!(
                    "webhook path {p} is taken by event driver {oname:?} in namespace {ons:?}"
                )));
            }
        }
        Kind::Alias => {
            let mut spec: AliasSpec = obj.typed_spec()?;
            for v in spec.named_versions() {
                check_kept(state, ns, &spec.function, v).await?;
            }
            let stored = state
                .get(ns, Kind::Alias, obj.name())
                .await?
                .and_then(|o| o.typed_spec::<AliasSpec>().ok());
            crate::versions::admit_alias(&mut spec, stored.as_ref());
            obj.spec = serde_json::to_value(spec)
                .map_err(|e| StateError::internal("encoding an alias", e))?;
        }
        Kind::Endpoint => {
            let spec: EndpointSpec = obj.typed_spec()?;
            if let Some(msg) = state.routes().conflict(&spec, (ns, obj.name())) {
                return Err(AdmitError::RouteConflict(msg));
            }
        }
    }
    Ok(obj)
}

/// Refuses a version the function does not keep.
async fn check_kept(state: &AppState, ns: &str, function: &str, v: u32) -> Result<(), AdmitError> {
    match crate::versions::check_version(state, ns, function, v).await {
        Ok(()) => Ok(()),
        Err(crate::versions::VersionError::State(e)) => Err(e.into()),
        Err(e) => Err(AdmitError::UnknownReference(e.to_string())),
    }
}

async fn base_image_spec(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<BaseImageSpec, AdmitError> {
    Ok(base_image(state, ns, name).await?.1)
}

async fn base_image(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<(Object, BaseImageSpec), AdmitError> {
    let Some(base) = state.get(ns, Kind::BaseImage, name).await? else {
        return Err(unknown(
            Kind::BaseImage,
            name,
            ns,
            "create it first (dispatch create base-image NAME IMAGE-REF) or use the built-in python3 or nodejs",
        ));
    };
    let spec = base.typed_spec()?;
    Ok((base, spec))
}

/// Refused: a built-in base image cannot be changed or deleted.
pub(crate) fn builtin(name: &str) -> AdmitError {
    AdmitError::BuiltIn(name.to_string())
}
