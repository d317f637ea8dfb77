//! Pulled images (DESIGN §9, container tier): manifests for this platform, layers kept once by
//! digest under `DATA_DIR/images/blobs`, unpacked into one read-only root file system per image
//! under `DATA_DIR/images/rootfs/<digest>`, and an index of references, sizes and last use in
//! `DATA_DIR/images/index.json`. A reference is resolved as Kubernetes does: `:latest` (or no
//! tag) is asked of the registry on every use, any other tag or a digest once
//! (`imagePullPolicy` overrides). Docker Hub references go to `--registry-mirror` when set.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt as _;
use jiff::Timestamp;
use oci_client::Reference;
use oci_client::manifest::{
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, OciDescriptor,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::unpack;
use crate::oci::{OciError, Registry, RegistryOptions};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("image {image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("image {image} is not pulled and its imagePullPolicy is Never")]
    NotPulled { image: String },
    #[error("image store: {0}")]
    Io(#[from] io::Error),
}

/// `imagePullPolicy` (Kubernetes' meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The container's `imagePullPolicy`, else Kubernetes' default for the reference.
    pub fn of(policy: Option<&str>, reference: &str) -> Result<PullPolicy, String> {
        match policy {
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            Some(other) => Err(format!(
                "imagePullPolicy is Always, IfNotPresent or Never, not {other:?}"
            )),
            None => {
                let r: Result<Reference, _> = reference.parse();
                Ok(match r {
                    Ok(r) if r.digest().is_none() && r.tag().is_none_or(|t| t == "latest") => {
                        PullPolicy::Always
                    }
                    _ => PullPolicy::IfNotPresent,
                })
            }
        }
    }
}

/// The parts of an image's config a container starts with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

impl ImageConfig {
    fn from_config(config: &Value) -> ImageConfig {
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        ImageConfig {
            env: strings(&c["Env"]),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            working_dir: c["WorkingDir"]
                .as_str()
                .filter(|w| !w.is_empty())
                .map(str::to_string),
        }
    }
}

/// One pulled image, as `dispatch get pulled-images` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PulledImage {
    /// The manifest's digest (for this platform).
    pub digest: String,
    /// References that resolved to it, as written (`alpine:latest`).
    pub references: Vec<String>,
    /// Layer blob digests, in order.
    pub layers: Vec<String>,
    /// Bytes of the compressed layers (what was downloaded).
    pub download_bytes: u64,
    /// Bytes of the files of its root file system.
    pub unpacked_bytes: u64,
    pub pulled_at: Timestamp,
    pub last_used: Timestamp,
    pub config: ImageConfig,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: BTreeMap<String, PulledImage>,
    references: BTreeMap<String, String>,
}

/// An image ready to run: its root file system stays while this is held.
pub struct Ready {
    pub digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Ready {
    fn drop(&mut self) {
        let mut m = self.in_use.lock();
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
            }
        }
    }
}

/// What `gc` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub what: &'static str,
    pub digest: String,
    pub bytes: u64,
}

/// Largest image (its compressed layers) pulled by default (`--max-image-size`).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 4 << 30;

/// How long a registry may send nothing before its pull fails: a stalled registry would
/// otherwise hold every pull of the server behind it (one pull at a time).
pub const PULL_STALL: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Images {
    dir: PathBuf,
    /// How long a registry may send nothing ([`PULL_STALL`]).
    stall: std::time::Duration,
    /// Largest image pulled (compressed layers); a bigger one is refused before any download.
    max_bytes: u64,
    registry: Registry,
    mirror: Option<String>,
    owners: bool,
    /// One pull at a time: two executions of one image share the first one's pull.
    pulls: tokio::sync::Mutex<()>,
    index: Mutex<Index>,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
}

fn hex_of(digest: &str) -> Result<&str, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest} is not sha256"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("digest {digest} is malformed"));
    }
    Ok(hex)
}

/// Reads through and hashes what it reads (a layer's diff id).
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Images {
    /// The image store under `data_dir/images`. `mirror`: a registry (`host[:port]`, with
    /// `http://` for plain HTTP) that serves Docker Hub's repositories.
    pub fn open(
        data_dir: &Path,
        mut options: RegistryOptions,
        mirror: Option<&str>,
    ) -> Result<Images, ImageError> {
        let dir = data_dir.join("images");
        for sub in ["blobs/sha256", "rootfs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = mirror.map(|m| {
            let host = m
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            if m.starts_with("http://") && !options.insecure.contains(&host) {
                options.insecure.push(host.clone());
            }
            host
        });
        let index = match std::fs::read(dir.join("index.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(
                    "images/index.json is unreadable ({e}); images will be pulled again"
                );
                Index::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(e.into()),
        };
        // Partial unpacks of a server that died mid-pull.
        for e in std::fs::read_dir(dir.join("rootfs"))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".partial-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        // Partial downloads too.
        for e in std::fs::read_dir(dir.join("blobs/sha256"))?.flatten() {
            if e.file_name().to_string_lossy().contains(".partial-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Images {
            dir,
            stall: PULL_STALL,
            max_bytes: DEFAULT_MAX_IMAGE_BYTES,
            registry: Registry::new(options),
            mirror,
            owners: nix::unistd::geteuid().is_root(),
            pulls: tokio::sync::Mutex::new(()),
            index: Mutex::new(index),
            in_use: Arc::default(),
        })
    }

    /// Refuses images whose compressed layers exceed `bytes` (`--max-image-size`).
    pub fn with_max_bytes(mut self, bytes: u64) -> Images {
        self.max_bytes = bytes;
        self
    }

    /// The reference pulled for `image`: Docker Hub's go to the mirror when there is one.
    fn source(&self, image: &str) -> Result<Reference, ImageError> {
        let r = crate::oci::parse(image)?;
        match &self.mirror {
            Some(m) if r.registry() == "docker.io" => Ok(match r.digest() {
                Some(d) => Reference::with_digest(m.clone(), r.repository().into(), d.into()),
                None => Reference::with_tag(
                    m.clone(),
                    r.repository().into(),
                    r.tag().unwrap_or("latest").into(),
                ),
            }),
            _ => Ok(r),
        }
    }

    fn rootfs(&self, digest: &str) -> PathBuf {
        self.dir
            .join("rootfs")
            .join(hex_of(digest).unwrap_or("invalid"))
    }

    fn blob(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn save(&self, index: &Index) -> io::Result<()> {
        let tmp = self.dir.join("index.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(index).expect("index serializes"),
        )?;
        std::fs::rename(tmp, self.dir.join("index.json"))
    }

    fn ready(&self, digest: &str, reference: &str) -> Result<Ready, ImageError> {
        let mut index = self.index.lock();
        let Some(img) = index.images.get_mut(digest) else {
            return Err(ImageError::NotPulled {
                image: reference.to_string(),
            });
        };
        img.last_used = Timestamp::now();
        if !img.references.iter().any(|r| r == reference) {
            img.references.push(reference.to_string());
        }
        let config = img.config.clone();
        index
            .references
            .insert(reference.to_string(), digest.to_string());
        self.save(&index)?;
        *self.in_use.lock().entry(digest.to_string()).or_default() += 1;
        Ok(Ready {
            digest: digest.to_string(),
            rootfs: self.rootfs(digest),
            config,
            in_use: self.in_use.clone(),
        })
    }

    fn cached(&self, reference: &str) -> Option<String> {
        let index = self.index.lock();
        let d = index.references.get(reference)?;
        (index.images.contains_key(d) && self.rootfs(d).is_dir()).then(|| d.clone())
    }

    /// `image` unpacked and ready to run, pulled when `policy` says so. `progress` hears a line
    /// per step of a pull.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Ready, ImageError> {
        if policy != PullPolicy::Always
            && let Some(d) = self.cached(image)
        {
            return self.ready(&d, image);
        }
        if policy == PullPolicy::Never {
            return Err(ImageError::NotPulled {
                image: image.to_string(),
            });
        }
        let _one = self.pulls.lock().await;
        if policy == PullPolicy::IfNotPresent
            && let Some(d) = self.cached(image)
        {
            return self.ready(&d, image);
        }
        let source = self.source(image)?;
        let auth = self.registry.auth_for(&source);
        let client = self.registry.client();
        let pulled =
            match tokio::time::timeout(self.stall, client.pull_manifest_and_config(&source, &auth))
                .await
            {
                Ok(r) => r.map_err(|e| {
                    ImageError::from(Registry::err(
                        &source,
                        format!("reading the manifest of {image}"),
                    )(e))
                }),
                Err(_) => Err(ImageError::Invalid {
                    image: image.to_string(),
                    reason: format!(
                        "its registry answered nothing for {}s while its manifest was read",
                        self.stall.as_secs()
                    ),
                }),
            };
        let (manifest, digest, config) = match pulled {
            Ok(p) => p,
            Err(e) => {
                // `:latest` asked again: a registry out of reach keeps the pulled one.
                if let Some(d) = self.cached(image) {
                    progress(format!(
                        "{image}: the registry is out of reach ({e}); running the image pulled before ({d})"
                    ));
                    return self.ready(&d, image);
                }
                return Err(e);
            }
        };
        hex_of(&digest).map_err(|reason| ImageError::Invalid {
            image: image.to_string(),
            reason,
        })?;
        if self.index.lock().images.contains_key(&digest) && self.rootfs(&digest).is_dir() {
            return self.ready(&digest, image);
        }
        let invalid = |reason: String| ImageError::Invalid {
            image: image.to_string(),
            reason,
        };
        let config: Value = serde_json::from_str(&config)
            .map_err(|e| invalid(format!("its config is not JSON: {e}")))?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != manifest.layers.len() {
            return Err(invalid(format!(
                "its config lists {} layers, its manifest {}",
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let total: i64 = manifest.layers.iter().map(|l| l.size.max(0)).sum();
        if total as u64 > self.max_bytes {
            return Err(invalid(format!(
                "its layers are {} compressed, more than this server pulls (--max-image-size {})",
                mib(total as u64),
                mib(self.max_bytes)
            )));
        }
        progress(format!(
            "pulling {image} ({digest}): {} layer(s), {}",
            manifest.layers.len(),
            mib(total as u64)
        ));
        let n = manifest.layers.len();
        for (i, layer) in manifest.layers.iter().enumerate() {
            self.download(&source, layer, i + 1, n, progress).await?;
        }
        let layers: Vec<OciDescriptor> = manifest.layers.clone();
        let (rootfs, blobs, owners) = (self.rootfs(&digest), self.dir.clone(), self.owners);
        let tmp = self.dir.join("rootfs").join(format!(
            ".partial-{}-{}",
            hex_of(&digest).unwrap_or_default(),
            std::process::id()
        ));
        let img = image.to_string();
        let unpacked = tokio::task::spawn_blocking(move || {
            unpack_all(&blobs, &layers, &diff_ids, &tmp, &rootfs, owners, &img)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        progress(format!(
            "unpacked {image}: {} in {} entries{}",
            mib(unpacked.bytes),
            unpacked.entries,
            if unpacked.skipped > 0 {
                format!(" ({} device node(s) or FIFO(s) left out)", unpacked.skipped)
            } else {
                String::new()
            }
        ));
        let now = Timestamp::now();
        let record = PulledImage {
            digest: digest.clone(),
            references: Vec::new(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            download_bytes: total as u64,
            unpacked_bytes: unpacked.bytes,
            pulled_at: now,
            last_used: now,
            config: ImageConfig::from_config(&config),
        };
        self.index.lock().images.insert(digest.clone(), record);
        self.ready(&digest, image)
    }

    /// Downloads one layer blob unless it is kept already, verified against its digest.
    async fn download(
        &self,
        source: &Reference,
        layer: &OciDescriptor,
        i: usize,
        n: usize,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), ImageError> {
        let path = self
            .blob(&layer.digest)
            .map_err(|reason| ImageError::Invalid {
                image: source.to_string(),
                reason,
            })?;
        let short = &layer.digest[..layer.digest.len().min(19)];
        if path.is_file() {
            progress(format!("layer {i}/{n} {short}: kept already"));
            return Ok(());
        }
        let mut stream = self
            .registry
            .client()
            .pull_blob_stream(source, layer)
            .await
            .map_err(Registry::err(
                source,
                format!("reading layer {}", layer.digest),
            ))?;
        let size = stream.content_length.unwrap_or(layer.size.max(0) as u64);
        let tmp = path.with_extension(format!("partial-{}", std::process::id()));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let (mut got, mut told) = (0u64, 0u64);
        let mut hash = Sha256::new();
        // More than the manifest says (what --max-image-size was checked against) is refused
        // as it arrives; so is a registry that stops sending.
        let declared = u64::try_from(layer.size).ok().filter(|n| *n > 0);
        loop {
            let failed = |reason: String| ImageError::Invalid {
                image: source.to_string(),
                reason,
            };
            let chunk = match tokio::time::timeout(self.stall, stream.next()).await {
                Ok(None) => break,
                Ok(Some(Ok(c))) if declared.is_some_and(|n| got + c.len() as u64 > n) => {
                    Err(failed(format!(
                        "layer {} is larger than the {} bytes its manifest says",
                        layer.digest, layer.size
                    )))
                }
                Ok(Some(Ok(c))) => Ok(c),
                Ok(Some(Err(e))) => Err(failed(format!("reading layer {}: {e}", layer.digest))),
                Err(_) => Err(failed(format!(
                    "its registry sent nothing of layer {} for {}s",
                    layer.digest,
                    self.stall.as_secs()
                ))),
            };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    drop(file);
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            };
            hash.update(&chunk);
            file.write_all(&chunk).await?;
            got += chunk.len() as u64;
            // A line per quarter of a large layer.
            if size > 4 << 20 && got - told >= size / 4 && got < size {
                told = got;
                progress(format!(
                    "layer {i}/{n} {short}: {} / {}",
                    mib(got),
                    mib(size)
                ));
            }
        }
        file.sync_all().await?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hash.finalize()));
        if actual != layer.digest {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ImageError::Invalid {
                image: source.to_string(),
                reason: format!("layer {} arrived as {actual}", layer.digest),
            });
        }
        tokio::fs::rename(&tmp, &path).await?;
        progress(format!("layer {i}/{n} {short}: {}", mib(got)));
        Ok(())
    }

    /// The manifest and config of `image` (as a base to install dependencies for), read from
    /// its registry (the mirror for Docker Hub's).
    pub async fn base(&self, image: &str) -> Result<crate::oci::BaseImage, ImageError> {
        let source = self.source(image)?;
        Ok(self.registry.base(&source.whole()).await?)
    }

    /// Every pulled image, newest use first.
    pub fn list(&self) -> Vec<PulledImage> {
        let mut v: Vec<PulledImage> = self.index.lock().images.values().cloned().collect();
        v.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        v
    }

    /// Removes images unused for `grace` (none that runs now, none that a reference in `keep`
    /// resolved to) and the layer blobs no image left names.
    pub fn gc(
        &self,
        grace: std::time::Duration,
        keep: &std::collections::HashSet<String>,
    ) -> Result<Vec<Collected>, ImageError> {
        let cutoff = Timestamp::now() - jiff::SignedDuration::try_from(grace).unwrap_or_default();
        let mut out = Vec::new();
        let mut index = self.index.lock();
        let busy: Vec<String> = self.in_use.lock().keys().cloned().collect();
        let old: Vec<String> = index
            .images
            .values()
            .filter(|i| i.last_used < cutoff && !busy.contains(&i.digest))
            .filter(|i| !i.references.iter().any(|r| keep.contains(r)))
            .map(|i| i.digest.clone())
            .collect();
        for d in old {
            if let Some(img) = index.images.remove(&d) {
                let root = self.rootfs(&d);
                if root.exists() {
                    std::fs::remove_dir_all(&root)?;
                }
                out.push(Collected {
                    what: "pulled-image",
                    digest: d.clone(),
                    bytes: img.unpacked_bytes,
                });
            }
            index.references.retain(|_, v| *v != d);
        }
        let named: std::collections::HashSet<&String> = index
            .images
            .values()
            .flat_map(|i| i.layers.iter())
            .collect();
        for e in std::fs::read_dir(self.dir.join("blobs/sha256"))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let digest = format!("sha256:{name}");
            if !named.contains(&digest) {
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(e.path())?;
                out.push(Collected {
                    what: "image-layer",
                    digest,
                    bytes,
                });
            }
        }
        self.save(&index)?;
        Ok(out)
    }
}

/// Applies every layer into `tmp`, checks each diff id, then renames `tmp` to `rootfs`.
fn unpack_all(
    blobs: &Path,
    layers: &[OciDescriptor],
    diff_ids: &[String],
    tmp: &Path,
    rootfs: &Path,
    owners: bool,
    image: &str,
) -> Result<unpack::Applied, ImageError> {
    let invalid = |reason: String| ImageError::Invalid {
        image: image.to_string(),
        reason,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)?;
    }
    std::fs::create_dir_all(tmp)?;
    let mut total = unpack::Applied::default();
    let result = (|| {
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let path = blobs
                .join("blobs/sha256")
                .join(hex_of(&layer.digest).map_err(invalid)?);
            let file = std::io::BufReader::new(std::fs::File::open(&path)?);
            let raw: Box<dyn Read> = match layer.media_type.as_str() {
                IMAGE_LAYER_GZIP_MEDIA_TYPE | IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => {
                    Box::new(flate2::read::GzDecoder::new(file))
                }
                IMAGE_LAYER_MEDIA_TYPE | IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => Box::new(file),
                other => {
                    return Err(invalid(format!(
                        "layer {} has media type {other}; the container tier unpacks gzip'd or plain tar layers",
                        layer.digest
                    )));
                }
            };
            let mut hashing = Hashing {
                inner: raw,
                hash: Sha256::new(),
            };
            let applied = unpack::apply_layer(tmp, &mut hashing, owners)
                .map_err(|e| invalid(format!("layer {}: {e}", layer.digest)))?;
            // The tar's end-of-archive padding is part of the diff id.
            io::copy(&mut hashing, &mut io::sink())?;
            let actual = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
            if &actual != diff_id {
                return Err(invalid(format!(
                    "layer {} unpacks to {actual}, its config says {diff_id}",
                    layer.digest
                )));
            }
            total.entries += applied.entries;
            total.bytes += applied.bytes;
            total.skipped += applied.skipped;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    std::fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // The writable /tmp is a tmpfs that the OCI runtime gives the mode of the directory it
    // covers: that one must exist and be sticky and world-writable, whatever the image says.
    let tmp_dir = unpack::resolve_in(tmp, Path::new("tmp"), true)?;
    if !tmp_dir.is_dir() {
        let _ = std::fs::remove_file(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir)?;
    }
    std::fs::set_permissions(
        &tmp_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)?;
    }
    std::fs::rename(tmp, rootfs)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::oci::sha256;

    /// How a hostile registry sends its one layer.
    #[derive(Clone, Copy)]
    enum Layer {
        /// Ten times the size its manifest declares.
        Bigger,
        /// A few bytes, then nothing, the connection held open.
        Stalls,
        /// The manifest itself never comes (the request is read, then nothing).
        NoManifest,
    }

    /// A registry on a free port serving `evil:1` (one layer of 1000 declared bytes) whose
    /// layer arrives as `layer` says.
    async fn hostile_registry(layer: Layer) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let blob = vec![7u8; 1000];
        let blob_digest = sha256(&blob);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(b"x")]}
        })
        .to_string();
        let config_digest = sha256(config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": blob_digest, "size": blob.len()}]
        })
        .to_string();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (manifest, config, blob_digest) =
                    (manifest.clone(), config.clone(), blob_digest.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let reply = |kind: &str, body: &[u8]| {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nDocker-Content-Digest: {}\r\n\r\n",
                            body.len(),
                            sha256(body)
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    };
                    if path.ends_with("/manifests/1") && matches!(layer, Layer::NoManifest) {
                        let _ = conn.read(&mut buf).await;
                    } else if path.ends_with("/manifests/1") {
                        let r = reply(
                            "application/vnd.oci.image.manifest.v1+json",
                            manifest.as_bytes(),
                        );
                        let _ = conn.write_all(&r).await;
                    } else if path.ends_with(&format!("/blobs/{blob_digest}")) {
                        match layer {
                            Layer::Bigger => {
                                let big = vec![7u8; 10_000];
                                let _ = conn
                                    .write_all(&reply("application/octet-stream", &big))
                                    .await;
                            }
                            Layer::Stalls | Layer::NoManifest => {
                                let _ = conn
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc",
                                    )
                                    .await;
                                // Held open, nothing more.
                                let _ = conn.read(&mut buf).await;
                            }
                        }
                    } else if path.contains("/blobs/") {
                        let _ = conn
                            .write_all(&reply("application/octet-stream", config.as_bytes()))
                            .await;
                    } else {
                        let _ = conn.write_all(&reply("application/json", b"{}")).await;
                    }
                });
            }
        });
        host
    }

    async fn pull(layer: Layer) -> (String, tempfile::TempDir) {
        let host = hostile_registry(layer).await;
        let dir = tempfile::tempdir().unwrap();
        let options = RegistryOptions {
            insecure: vec![host.clone()],
            ..Default::default()
        };
        let mut images = Images::open(dir.path(), options, None).unwrap();
        images.stall = Duration::from_secs(1);
        let err = images
            .ensure(&format!("{host}/evil:1"), PullPolicy::Always, &|_| {})
            .await
            .err()
            .expect("the pull fails");
        (err.to_string(), dir)
    }

    fn nothing_left(dir: &Path) {
        let blobs: Vec<_> = std::fs::read_dir(dir.join("images/blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(blobs.is_empty(), "left behind: {blobs:?}");
    }

    #[tokio::test]
    async fn a_layer_bigger_than_its_manifest_says_is_refused_as_it_arrives() {
        let (err, dir) = pull(Layer::Bigger).await;
        assert!(
            err.contains("larger than the 1000 bytes its manifest says"),
            "{err}"
        );
        nothing_left(dir.path());
    }

    #[tokio::test]
    async fn a_registry_that_stops_sending_fails_the_pull() {
        let (err, dir) = pull(Layer::Stalls).await;
        assert!(err.contains("sent nothing of layer"), "{err}");
        nothing_left(dir.path());
        let (err, dir) = pull(Layer::NoManifest).await;
        assert!(
            err.contains("answered nothing for 1s while its manifest was read"),
            "{err}"
        );
        nothing_left(dir.path());
    }
}
