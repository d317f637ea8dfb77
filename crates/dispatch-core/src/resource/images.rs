//! Base images and images: the language a base image runs, and an image's dependencies.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::*;
use crate::ValidationError;
use crate::names::validate_name;

/// The language a base image runs.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python3,
    Nodejs,
    Exec,
}

impl Language {
    pub fn parse(s: &str) -> Option<Language> {
        match s.to_ascii_lowercase().as_str() {
            "python3" | "python" => Some(Language::Python3),
            "nodejs" | "node" => Some(Language::Nodejs),
            "exec" => Some(Language::Exec),
            _ => None,
        }
    }

    /// Infers the language from an image reference that names it
    /// (`dispatchframework/python3-base:0.0.13` → python3, `node:20` → nodejs).
    pub fn infer_from_image(reference: &str) -> Option<Language> {
        let repo = reference.rsplit('/').next().unwrap_or(reference);
        let repo = repo
            .split([':', '@'])
            .next()
            .unwrap_or(repo)
            .to_ascii_lowercase();
        if repo.contains("python") {
            Some(Language::Python3)
        } else if repo.contains("node") {
            Some(Language::Nodejs)
        } else {
            None
        }
    }

    /// The interpreter run in embedded mode when the base image names none.
    pub fn default_interpreter(self) -> Option<&'static str> {
        match self {
            Language::Python3 => Some("python3"),
            Language::Nodejs => Some("node"),
            Language::Exec => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python3 => "python3",
            Language::Nodejs => "nodejs",
            Language::Exec => "exec",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A language runtime that images build on: an OCI image reference (what the Kubernetes
/// backend runs) and its language; the embedded backend runs the host's interpreter.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseImageSpec {
    /// OCI reference (used as is by the Kubernetes backend).
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Language>,
    /// Embedded mode: interpreter path or name on PATH (default `python3` / `node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
}

impl BaseImageSpec {
    pub(super) fn normalize(mut self, obj: &Object) -> Result<Self, ValidationError> {
        if self.image.trim().is_empty() {
            return Err(ValidationError::new(format!(
                "base image {:?} needs spec.image, an image reference such as python:3.11-slim",
                obj.metadata.name
            )));
        }
        if self.language.is_none() {
            self.language = Language::infer_from_image(&self.image);
        }
        if self.language.is_none() {
            return Err(ValidationError::new(format!(
                "cannot tell the language of base image {:?} from {:?}: set the language \
                 (--language python3|nodejs|exec, or spec.language)",
                obj.metadata.name, self.image
            )));
        }
        if self.language == Some(Language::Exec) && self.interpreter.is_some() {
            return Err(ValidationError::new(format!(
                "base image {:?}: exec base images run the handler itself (an executable), so \
                 spec.interpreter is not used: remove it, or use python3 / nodejs",
                obj.metadata.name
            )));
        }
        Ok(self)
    }

    /// The language; set by normalization, so always present on a stored base image.
    pub fn lang(&self) -> Language {
        self.language.unwrap_or(Language::Exec)
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeDependencies {
    /// Text of requirements.txt (Python) or package.json (Node).
    #[serde(default)]
    pub manifest: String,
    /// Package index: pip's `--index-url` / npm's `--registry` (default: the server's
    /// environment, e.g. `PIP_INDEX_URL`, `npm_config_registry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_url: Option<String>,
}

impl RuntimeDependencies {
    /// The manifest in normal form for `language`, `None` when it declares nothing: what the
    /// image digest covers, so that comments, blank lines, whitespace and JSON key order do
    /// not cause a rebuild. requirements.txt: trimmed lines without comments; package.json:
    /// re-encoded with sorted keys.
    pub fn normalized(&self, language: Language) -> Result<Option<String>, ValidationError> {
        let text = self.manifest.trim();
        if text.is_empty() {
            return Ok(None);
        }
        match language {
            Language::Python3 => {
                if text.starts_with('{') {
                    return Err(ValidationError::new(
                        "python3 images take a requirements.txt (one requirement per line), not a package.json",
                    ));
                }
                let lines: Vec<&str> = text
                    .lines()
                    .map(|l| match l.find(" #") {
                        Some(i) => l[..i].trim(),
                        None => l.trim(),
                    })
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                Ok((!lines.is_empty()).then(|| lines.join("\n") + "\n"))
            }
            Language::Nodejs => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    ValidationError::new(format!(
                        "nodejs images take a package.json; this one is not valid JSON: {e}"
                    ))
                })?;
                if !v.is_object() {
                    return Err(ValidationError::new("package.json must be a JSON object"));
                }
                Ok(Some(v.to_string()))
            }
            Language::Exec => Err(ValidationError::new(
                "exec images have no runtime dependencies to install: package what the executable needs with it",
            )),
        }
    }
}

/// An image: a base image plus language dependencies, built once per digest (the SHA-256
/// of the base image and the normalized manifest).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// The base image (same namespace, or a built-in one: python3, nodejs) it builds on.
    pub base_image: String,
    /// Language dependencies installed into the image: a requirements.txt (python3) or
    /// package.json (nodejs) manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dependencies: Option<RuntimeDependencies>,
    /// System packages: refused by both backends for now (install them in the base image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_dependencies: Vec<serde_json::Value>,
    /// Python: modules the image's zygote imports once, before it forks workers, so that a
    /// cold start does not import them again. Unset: every top-level module the image's
    /// dependencies installed; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<Vec<String>>,
}

impl ImageSpec {
    pub(super) fn normalize(self) -> Result<Self, ValidationError> {
        validate_name("base image", &self.base_image)?;
        if let Some(list) = &self.preload {
            for (i, m) in list.iter().enumerate() {
                let ok = !m.is_empty()
                    && m.split('.').all(|part| {
                        let mut c = part.chars();
                        c.next()
                            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                    });
                if !ok {
                    return Err(ValidationError::new(format!(
                        "spec.preload[{i}]: {m:?} is not a Python module name (like numpy or os.path)"
                    )));
                }
            }
        }
        Ok(self)
    }
}
