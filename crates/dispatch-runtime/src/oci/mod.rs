//! Daemonless OCI images (DESIGN §8): layers are built in memory as reproducible
//! tar.gz (sorted entries, mtime 0, root-owned), a base image's manifest and config are read
//! from its registry, the new layers are appended, and blobs, config and manifest are pushed,
//! each only when the target registry does not have it already. No Docker daemon, no
//! privileges: the same bytes give the same digests, so an unchanged function pushes nothing.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
    OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub mod function;
mod layer;
pub use layer::{Layer, LayerBuilder};

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("bad image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry {registry}: {what}: {source}")]
    Registry {
        registry: String,
        what: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("base image {image}: {reason}")]
    Base { image: String, reason: String },
    #[error("registry credentials: {0}")]
    Credentials(String),
    #[error("layer: {0}")]
    Layer(String),
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What an image adds to its base's config.
#[derive(Debug, Clone, Default)]
pub struct ConfigChanges {
    /// Set (or replace) these variables.
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub exposed_ports: Vec<u16>,
    pub labels: BTreeMap<String, String>,
}

/// A base image as read from its registry (for this platform when it is an index).
pub struct BaseImage {
    pub reference: String,
    pub manifest: OciImageManifest,
    pub config: Value,
}

impl BaseImage {
    /// A variable of the image's environment (`config.Env`).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.config["config"]["Env"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
    }
}

/// An image to assemble: `base` plus `layers`, pushed as `target` (a repository with a tag).
pub struct ImagePlan {
    pub base: BaseImage,
    pub target: String,
    pub layers: Vec<Layer>,
    pub config: ConfigChanges,
}

/// What a push did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pushed {
    /// Pullable by digest: `registry/repository@sha256:…`.
    pub reference: String,
    pub digest: String,
    pub blobs_pushed: usize,
    pub blobs_mounted: usize,
    pub blobs_present: usize,
    pub bytes_pushed: u64,
    pub manifest_pushed: bool,
}

/// Registry access: which registries speak plain HTTP, and credentials per registry.
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// `host[:port]` of registries reached over plain HTTP (a local test registry).
    pub insecure: Vec<String>,
    /// Credentials by registry host (`host[:port]`).
    pub auth: HashMap<String, (String, String)>,
}

impl RegistryOptions {
    /// Reads a Docker config (`~/.docker/config.json`, or the `.dockerconfigjson` of a
    /// Kubernetes Secret): `{"auths": {"host": {"auth": base64(user:pass)} | {"username",
    /// "password"}}}`.
    pub fn add_docker_config(&mut self, json: &[u8]) -> Result<(), OciError> {
        use base64::Engine as _;
        let v: Value = serde_json::from_slice(json)
            .map_err(|e| OciError::Credentials(format!("not a docker config: {e}")))?;
        let Some(auths) = v.get("auths").and_then(Value::as_object) else {
            return Err(OciError::Credentials(
                "a docker config needs an \"auths\" object".into(),
            ));
        };
        for (host, a) in auths {
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .trim_end_matches("/v2")
                .to_string();
            let pair = if let Some(b64) = a.get("auth").and_then(Value::as_str) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| OciError::Credentials(format!("{host}: auth: {e}")))?;
                let s = String::from_utf8(raw)
                    .map_err(|_| OciError::Credentials(format!("{host}: auth is not UTF-8")))?;
                let (u, p) = s.split_once(':').ok_or_else(|| {
                    OciError::Credentials(format!("{host}: auth is not user:password"))
                })?;
                (u.to_string(), p.to_string())
            } else {
                match (
                    a.get("username").and_then(Value::as_str),
                    a.get("password").and_then(Value::as_str),
                ) {
                    (Some(u), Some(p)) => (u.to_string(), p.to_string()),
                    _ => {
                        return Err(OciError::Credentials(format!(
                            "{host}: needs \"auth\" or \"username\" and \"password\""
                        )));
                    }
                }
            };
            self.auth.insert(host, pair);
        }
        Ok(())
    }
}

pub struct Registry {
    client: Client,
    options: RegistryOptions,
}

pub(crate) fn parse(reference: &str) -> Result<Reference, OciError> {
    reference
        .parse()
        .map_err(|e: oci_client::ParseError| OciError::Reference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// OCI media types for base layers that came in Docker's.
fn oci_layer_type(media_type: &str) -> &str {
    match media_type {
        IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => IMAGE_LAYER_GZIP_MEDIA_TYPE,
        IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => IMAGE_LAYER_MEDIA_TYPE,
        other => other,
    }
}

impl Registry {
    pub fn new(options: RegistryOptions) -> Registry {
        // The one rustls provider of the project (DESIGN §11), unless the binary set it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if options.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(options.insecure.clone())
        };
        let client = Client::new(ClientConfig {
            protocol,
            // Whole blobs in one PUT: the CNCF registry and every hosted one accept it.
            use_monolithic_push: true,
            ..Default::default()
        });
        Registry { client, options }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn auth_for(&self, r: &Reference) -> RegistryAuth {
        match self.options.auth.get(r.resolve_registry()) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    pub(crate) fn err(
        r: &Reference,
        what: impl Into<String>,
    ) -> impl FnOnce(oci_client::errors::OciDistributionError) -> OciError {
        let registry = r.resolve_registry().to_string();
        let what = what.into();
        move |source| OciError::Registry {
            registry,
            what,
            source,
        }
    }

    /// The manifest (for this platform, when the base is an index) and config of an image.
    pub async fn base(&self, image: &str) -> Result<BaseImage, OciError> {
        let r = parse(image)?;
        let (manifest, _digest, config) = self
            .client
            .pull_manifest_and_config(&r, &self.auth_for(&r))
            .await
            .map_err(Self::err(&r, format!("reading the manifest of {image}")))?;
        let config: Value = serde_json::from_str(&config).map_err(|e| OciError::Base {
            image: image.to_string(),
            reason: format!("its config is not JSON: {e}"),
        })?;
        Ok(BaseImage {
            reference: image.to_string(),
            manifest,
            config,
        })
    }

    /// Pushes `blob` (with `digest`) to `target` unless it is there. Returns whether it was
    /// uploaded.
    async fn push_blob(
        &self,
        target: &Reference,
        blob: Bytes,
        digest: &str,
    ) -> Result<bool, OciError> {
        if self.has_blob(target, digest).await? {
            return Ok(false);
        }
        self.client
            .push_blob(target, blob, digest)
            .await
            .map_err(Self::err(target, format!("pushing blob {digest}")))?;
        Ok(true)
    }

    /// Assembles `plan` and pushes what the target registry lacks.
    pub async fn push(&self, plan: &ImagePlan) -> Result<Pushed, OciError> {
        let base = parse(&plan.base.reference)?;
        let target = self.authenticated(&plan.target).await?;
        let mut done = Pushed::default();

        // The base's layers: present, mounted from the base repository (same registry), or
        // copied through this process.
        let same_registry = base.resolve_registry() == target.resolve_registry();
        let mut layers = Vec::new();
        for l in &plan.base.manifest.layers {
            let mut d = l.clone();
            d.media_type = oci_layer_type(&l.media_type).to_string();
            layers.push(d);
            if self.has_blob(&target, &l.digest).await? {
                done.blobs_present += 1;
                continue;
            }
            if same_registry
                && self
                    .client
                    .mount_blob(&target, &base, &l.digest)
                    .await
                    .is_ok()
            {
                done.blobs_mounted += 1;
                continue;
            }
            let mut blob = Vec::with_capacity(l.size.max(0) as usize);
            self.client
                .pull_blob(&base, l, &mut blob)
                .await
                .map_err(Self::err(&base, format!("reading base layer {}", l.digest)))?;
            done.bytes_pushed += blob.len() as u64;
            self.client
                .push_blob(&target, blob, &l.digest)
                .await
                .map_err(Self::err(
                    &target,
                    format!("pushing base layer {}", l.digest),
                ))?;
            done.blobs_pushed += 1;
        }
        let mut config = plan.base.config.clone();
        apply_config(&mut config, &plan.layers, &plan.config).map_err(|reason| OciError::Base {
            image: plan.base.reference.clone(),
            reason,
        })?;
        self.finish(&target, layers, &plan.layers, &config, done)
            .await
    }

    /// Pushes an image made only of `layers` with `config` (its `rootfs.diff_ids` must list
    /// them): a base image of one's own, or a test fixture.
    pub async fn push_scratch(
        &self,
        target: &str,
        layers: &[Layer],
        config: &Value,
    ) -> Result<Pushed, OciError> {
        let target = self.authenticated(target).await?;
        self.finish(&target, Vec::new(), layers, config, Pushed::default())
            .await
    }

    async fn authenticated(&self, target: &str) -> Result<Reference, OciError> {
        let target = parse(target)?;
        self.client
            .auth(&target, &self.auth_for(&target), RegistryOperation::Push)
            .await
            .map_err(Self::err(&target, "authenticating to push"))?;
        Ok(target)
    }

    async fn has_blob(&self, target: &Reference, digest: &str) -> Result<bool, OciError> {
        self.client
            .blob_exists(target, digest)
            .await
            .map_err(Self::err(target, format!("checking blob {digest}")))
    }

    /// Pushes the new layers, the config and the manifest (each unless present).
    async fn finish(
        &self,
        target: &Reference,
        mut descriptors: Vec<OciDescriptor>,
        layers: &[Layer],
        config: &Value,
        mut done: Pushed,
    ) -> Result<Pushed, OciError> {
        for l in layers {
            if self.push_blob(target, l.data.clone(), &l.digest).await? {
                done.blobs_pushed += 1;
                done.bytes_pushed += l.data.len() as u64;
            } else {
                done.blobs_present += 1;
            }
            descriptors.push(OciDescriptor {
                media_type: IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
                digest: l.digest.clone(),
                size: l.data.len() as i64,
                ..Default::default()
            });
        }
        let config_bytes = Bytes::from(serde_json::to_vec(config).expect("JSON value"));
        let config_digest = sha256(&config_bytes);
        if self
            .push_blob(target, config_bytes.clone(), &config_digest)
            .await?
        {
            done.blobs_pushed += 1;
            done.bytes_pushed += config_bytes.len() as u64;
        } else {
            done.blobs_present += 1;
        }
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: OciDescriptor {
                media_type: IMAGE_CONFIG_MEDIA_TYPE.to_string(),
                digest: config_digest,
                size: config_bytes.len() as i64,
                ..Default::default()
            },
            layers: descriptors,
            subject: None,
            artifact_type: None,
            annotations: None,
        };
        let body = Bytes::from(serde_json::to_vec(&manifest).expect("manifest serializes"));
        let digest = sha256(&body);
        let present = match self
            .client
            .fetch_manifest_digest(target, &self.auth_for(target))
            .await
        {
            Ok(d) => d == digest,
            Err(_) => false, // not there (or unreadable): push it
        };
        if !present {
            self.client
                .push_manifest_raw(target, body, OCI_IMAGE_MEDIA_TYPE.parse().expect("ascii"))
                .await
                .map_err(Self::err(target, "pushing the manifest"))?;
            done.manifest_pushed = true;
        }
        done.reference = format!(
            "{}/{}@{digest}",
            target.resolve_registry(),
            target.repository()
        );
        done.digest = digest;
        Ok(done)
    }
}

/// The base's config with the new layers' diff ids and history, and `changes` applied.
fn apply_config(
    config: &mut Value,
    layers: &[Layer],
    changes: &ConfigChanges,
) -> Result<(), String> {
    let root = config
        .as_object_mut()
        .ok_or("its config is not a JSON object")?;
    let rootfs = root
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .get_mut("diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or("its config has no rootfs.diff_ids")?;
    diff_ids.extend(layers.iter().map(|l| Value::from(l.diff_id.clone())));
    let history = root
        .entry("history")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or("its config's history is not a list")?;
    history.extend(layers.iter().map(|l| {
        json!({"created": "1970-01-01T00:00:00Z", "created_by": l.created_by, "comment": "dispatch"})
    }));
    // Docker's config keeps the runtime settings under "config"; older ones also under
    // "container_config", which is informational and left as it is.
    let c = root
        .entry("config")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("its config's \"config\" is not an object")?;
    let mut env: Vec<String> = c
        .get("Env")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in &changes.env {
        let prefix = format!("{k}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{k}={v}"));
    }
    c.insert("Env".into(), json!(env));
    c.insert("Entrypoint".into(), json!(changes.entrypoint));
    c.insert("Cmd".into(), json!(changes.cmd));
    if let Some(w) = &changes.working_dir {
        c.insert("WorkingDir".into(), json!(w));
    }
    if !changes.exposed_ports.is_empty() {
        let ports = c
            .entry("ExposedPorts")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or("its config's ExposedPorts is not an object")?;
        for p in &changes.exposed_ports {
            ports.insert(format!("{p}/tcp"), json!({}));
        }
    }
    if !changes.labels.is_empty() {
        let labels = c.entry("Labels").or_insert_with(|| json!({}));
        if labels.is_null() {
            *labels = json!({});
        }
        let labels = labels
            .as_object_mut()
            .ok_or("its config's Labels is not an object")?;
        for (k, v) in &changes.labels {
            labels.insert(k.clone(), json!(v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
