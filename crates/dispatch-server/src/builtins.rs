//! The built-in base images every namespace has (`python3`, `nodejs`): never stored, never
//! changed, listed and read like stored ones. A leaf module: the state, admission and the API
//! read it, it reads none of them.

use dispatch_core::{BaseImageSpec, Kind, Language, Object, Phase, Status};

/// Names of the base images every namespace has.
pub const BUILTIN_BASE_IMAGES: [&str; 2] = ["python3", "nodejs"];

/// The built-in base image `name` of namespace `ns` (`python3`, `nodejs`), if it is one.
pub fn builtin_base_image(ns: &str, name: &str) -> Option<Object> {
    let (image, language) = match name {
        "python3" => ("python:3-slim", Language::Python3),
        "nodejs" => ("node:20-slim", Language::Nodejs),
        _ => return None,
    };
    let spec = BaseImageSpec {
        image: image.into(),
        language: Some(language),
        interpreter: None,
    };
    let mut o = Object::new(Kind::BaseImage, ns, name, spec);
    o.metadata
        .labels
        .insert("dispatch.dev/builtin".into(), "true".into());
    o.status = Status::phase(Phase::Ready);
    Some(o)
}
