//! Base images and images: a base image is checked by the backend; an image waits for its
//! base image, gets its digest (`image_plan`), is built (`Backend::build_image`, progress in the
//! CREATING reason) and re-queues its functions. `function_digest` is a function's digest
//! from its image and source.

use dispatch_core::{
    BaseImageSpec, FunctionSpec, ImageSpec, Kind, Language, Object, Phase, Status, digest,
};
use dispatch_runtime::{BaseImageCheck, ImageBuild};

use super::ReconcileError;
use super::{Key, dependents, mark_creating, set_status, status, with_steps};
use crate::state::AppState;

/// The language and interpreter of a base image spec.
pub fn base_check(spec: &BaseImageSpec) -> BaseImageCheck {
    BaseImageCheck {
        image: spec.image.clone(),
        language: spec.lang(),
        interpreter: spec.interpreter.clone(),
    }
}

pub(super) async fn reconcile_base_image(
    state: &AppState,
    key: &Key,
) -> Result<(), ReconcileError> {
    let Some(o) = state
        .get(&key.namespace, Kind::BaseImage, &key.name)
        .await?
    else {
        return Ok(());
    };
    let spec: BaseImageSpec = match o.typed_spec() {
        Ok(s) => s,
        Err(e) => return set_status(state, &o, status(Phase::Error, e.message, None, &o)).await,
    };
    let d = digest::sha256_parts([
        b"baseimage".as_slice(),
        serde_json::to_string(&o.spec)
            .unwrap_or_default()
            .as_bytes(),
    ]);
    if o.phase() != Some(Phase::Ready) || o.status.digest.as_deref() != Some(&d) {
        mark_creating(state, &o, "checking the interpreter").await?;
    }
    // The embedded backend runs the host's interpreter: the reference is kept for the
    // Kubernetes backend, and the status says so instead of ignoring it silently.
    let note = match (state.backend.name(), spec.lang()) {
        ("embedded", Language::Exec) => format!(
            "the embedded backend runs handlers on this host; the image {} is used by the Kubernetes backend",
            spec.image
        ),
        ("embedded", lang) => format!(
            "the embedded backend runs this host's {}; the image {} is used by the Kubernetes backend",
            spec.interpreter
                .as_deref()
                .or(lang.default_interpreter())
                .unwrap_or("interpreter"),
            spec.image
        ),
        _ => String::new(),
    };
    let new = match state.backend.check_base_image(&base_check(&spec)).await {
        Ok(()) => status(Phase::Ready, note, Some(d), &o),
        Err(e) => status(Phase::Error, e.to_string(), None, &o),
    };
    set_status(state, &o, new).await?;
    dependents(
        state,
        &key.namespace,
        Kind::Image,
        Kind::BaseImage,
        &key.name,
    )
    .await
}

/// An image's base image, if it exists, with its check.
pub(super) async fn image_base(
    state: &AppState,
    ns: &str,
    spec: &ImageSpec,
) -> Result<Result<(Object, BaseImageSpec), String>, ReconcileError> {
    let Some(base) = state.get(ns, Kind::BaseImage, &spec.base_image).await? else {
        return Ok(Err(format!(
            "base image {:?} not found in namespace {ns:?}",
            spec.base_image
        )));
    };
    match base.typed_spec::<BaseImageSpec>() {
        Ok(b) => Ok(Ok((base, b))),
        Err(e) => Ok(Err(e.message)),
    }
}

pub(super) async fn reconcile_image(state: &AppState, key: &Key) -> Result<(), ReconcileError> {
    let Some(o) = state.get(&key.namespace, Kind::Image, &key.name).await? else {
        return Ok(());
    };
    let result = build_image(state, &o).await?;
    if let Some(new) = result {
        set_status(state, &o, new).await?;
    }
    dependents(
        state,
        &key.namespace,
        Kind::Function,
        Kind::Image,
        &key.name,
    )
    .await
}

/// The new status of an image, or `None` while it waits for its base image.
async fn build_image(state: &AppState, o: &Object) -> Result<Option<Status>, ReconcileError> {
    let spec: ImageSpec = match o.typed_spec() {
        Ok(s) => s,
        Err(e) => return Ok(Some(status(Phase::Error, e.message, None, o))),
    };
    let (base, base_spec) = match image_base(state, o.namespace(), &spec).await? {
        Ok(b) => b,
        Err(reason) => return Ok(Some(status(Phase::Error, reason, None, o))),
    };
    match base.phase() {
        Some(Phase::Ready) => {}
        Some(Phase::Error) => {
            let reason = format!(
                "base image {:?} failed: {}",
                base.name(),
                base.status.reason
            );
            return Ok(Some(status(Phase::Error, reason, None, o)));
        }
        _ => {
            let reason = format!("waiting for base image {:?}", base.name());
            set_status(state, o, status(Phase::Initialized, reason, None, o)).await?;
            return Ok(None);
        }
    }
    let (d, build) = match image_plan(&spec, &base, &base_spec) {
        Ok(p) => p,
        Err(e) => return Ok(Some(status(Phase::Error, e.message, None, o))),
    };
    let unchanged = o.phase() == Some(Phase::Ready) && o.status.digest.as_deref() == Some(&d);
    if !unchanged {
        set_status(
            state,
            o,
            status(Phase::Creating, "building", Some(d.clone()), o),
        )
        .await?;
    }
    let started = std::time::Instant::now();
    let result = with_steps(state, o, Some(d.clone()), !unchanged, |progress| {
        state.backend.build_image(&d, &build, progress)
    })
    .await?;
    if !unchanged {
        let error = result.as_ref().err().map(|e| e.to_string());
        super::build_ended(
            state,
            crate::metrics::Build::Image,
            o,
            error,
            started.elapsed(),
        );
    }
    Ok(Some(match result {
        Ok(()) => status(Phase::Ready, "", Some(d.clone()), o),
        // The digest stays, so that `dispatch logs image` finds the failed build's log.
        Err(e) => status(Phase::Error, e.to_string(), Some(d.clone()), o),
    }))
}

/// An image's digest (base image spec + normalized dependency manifest + index, DESIGN §3)
/// and what to build; an invalid manifest for the base's language is an error.
pub fn image_plan(
    spec: &ImageSpec,
    base: &Object,
    base_spec: &BaseImageSpec,
) -> Result<(String, ImageBuild), dispatch_core::ValidationError> {
    let deps = match &spec.runtime_dependencies {
        Some(r) => r.normalized(base_spec.lang())?,
        None => None,
    };
    let index_url = spec
        .runtime_dependencies
        .as_ref()
        .and_then(|r| r.index_url.clone())
        .filter(|u| !u.trim().is_empty());
    let d = digest::sha256_parts([
        b"image".as_slice(),
        serde_json::to_string(&base.spec)
            .unwrap_or_default()
            .as_bytes(),
        deps.as_deref().unwrap_or("").as_bytes(),
        index_url.as_deref().unwrap_or("").as_bytes(),
    ]);
    let build = ImageBuild {
        base: base_check(base_spec),
        runtime_dependencies: deps,
        index_url,
        system_dependencies: spec.system_dependencies.len(),
    };
    Ok((d, build))
}

/// The function digest: the image digest, the source, the handler and every runtime setting
/// (DESIGN §3), so that an unchanged function is never rebuilt. The image's zygote preload
/// list counts too (when set), so that changing it moves functions to a new zygote.
pub fn function_digest(
    image_digest: &str,
    base: &BaseImageSpec,
    image: &ImageSpec,
    spec: &FunctionSpec,
) -> String {
    let mut settings = serde_json::json!({
        "handler": spec.handler,
        "timeout": spec.timeout,
        "env": spec.env,
        "concurrency": spec.concurrency,
        "language": base.lang().as_str(),
        "interpreter": base.interpreter,
    });
    if let Some(p) = &image.preload {
        settings["preload"] = serde_json::json!(p);
    }
    // Only when set: the digests of functions without it stay as they were.
    if let Some(i) = spec.isolation {
        settings["isolation"] = serde_json::json!(i);
    }
    digest::sha256_parts([
        b"function".as_slice(),
        image_digest.as_bytes(),
        spec.source.as_deref().unwrap_or("").as_bytes(),
        settings.to_string().as_bytes(),
    ])
}
