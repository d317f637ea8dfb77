//! `dispatch k8s`: Kubernetes helpers. `crds` prints the CustomResourceDefinitions of every
//! Dispatch kind; `image` builds a function's OCI image without a Docker daemon and pushes it
//! to a registry (what the Kubernetes backend does for every function).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use dispatch_core::Language;
use dispatch_k8s::image::ImageRequest;
use dispatch_k8s::oci::{Registry, RegistryOptions};

/// Kubernetes helpers: CRDs, function images
#[derive(Debug, clap::Args)]
pub struct K8s {
    #[command(subcommand)]
    pub what: K8sWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum K8sWhat {
    /// Print the CRDs of every kind (multi-document YAML)
    #[command(
        after_help = "One dispatch.dev/v1 CRD per kind (namespaced, status subresource), with a structural schema generated from the types the API validates with: the API server refuses a malformed resource and `kubectl explain function.spec` documents the fields. The Kubernetes backend keeps every resource as one of these."
    )]
    Crds,
    /// Build a function's image on a base image and push it to a registry (no Docker daemon)
    Image(Box<ImageArgs>),
    /// Print what installs Dispatch on a cluster: namespace, CRDs, RBAC, volume, server, Services
    Manifests(ManifestArgs),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Everything `kubectl apply -f -` needs to run `dispatch server --backend kubernetes`: its namespace, the CRDs, a service account with a ClusterRole limited to what the server does (Dispatch's custom resources and their status, which hold every resource; creating namespaces; function Deployments, Services, autoscalers or Knative Services; Jobs, their pods and logs) and a Role for the scheduler's Lease, a PersistentVolumeClaim for the SQL store (run records, job executions, events, tokens), the server Deployment (one replica, Recreate: one SQLite writer) and Services for the API (8080) and the gateway (8081). Registry credentials: a kubernetes.io/dockerconfigjson Secret named by --registry-secret in the same namespace (optional).\n\nHigh availability: with --database-secret NAME --replicas 3 the records live in PostgreSQL (e.g. a managed one) and there is no volume: three active replicas behind the Services, each serving the API and the gateway and running async runs, rolled one at a time (RollingUpdate, maxUnavailable 0; a stopping replica answers /readyz 503 for 5 s before its listeners close), a PodDisruptionBudget of one, and a replica that dies has its runs taken over by the others within 10 s. Make the Secret first:\n  kubectl -n dispatch create secret generic dispatch-db --from-literal=url='postgres://dispatch@db.example:5432/dispatch?sslmode=require' --from-literal=password=... --from-file=secret-key=<(head -c 32 /dev/urandom)"
)]
pub struct ManifestArgs {
    /// The server's image (the dispatch binary with python3/pip and node/npm)
    #[arg(long)]
    pub image: String,
    /// Where function images are pushed (registry host and path)
    #[arg(long)]
    pub registry: String,
    /// The server's namespace
    #[arg(long, default_value = "dispatch")]
    pub namespace: String,
    /// A registry (host:port) reached over plain HTTP; repeatable
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// The dockerconfigjson Secret with push credentials
    #[arg(long, default_value = "dispatch-registry")]
    pub registry_secret: String,
    /// Run functions as Knative Services
    #[arg(long)]
    pub knative: bool,
    /// Size of the SQL store's volume (SQLite; not with --database-secret)
    #[arg(long, default_value = "1Gi", conflicts_with = "database_secret")]
    pub storage: String,
    /// Keep records in PostgreSQL, from this Secret in the namespace: key `url` (a
    /// postgres:// URL), optional `password`, and `secret-key` (32 random bytes sealing
    /// secrets, shared by every replica). Then the server runs --replicas active replicas
    /// with no volume, rolled one at a time, with a PodDisruptionBudget
    #[arg(long, value_name = "SECRET")]
    pub database_secret: Option<String>,
    /// Server replicas, all active (with --database-secret)
    #[arg(long, default_value_t = 1, value_name = "N", requires = "database_secret", value_parser = clap::value_parser!(i32).range(1..=100))]
    pub replicas: i32,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Layers added to the base: this `dispatch` binary as the runner (entrypoint `dispatch runner`), the language bootstrap, the dependencies installed for the image's platform, and the source under /function. The tag is the content digest; blobs and the manifest are pushed only when the registry lacks them. Credentials come from a Docker config (--docker-config, else $DOCKER_CONFIG/config.json or ~/.docker/config.json)."
)]
pub struct ImageArgs {
    /// Function name (the image is <repository>/<name>:<digest hex>)
    pub name: String,
    /// A source file or folder
    pub path: PathBuf,
    /// The language runtime image to build on (e.g. python:3.11-slim, node:20-slim)
    #[arg(long)]
    pub base: String,
    /// Where to push: registry host and path (e.g. registry.example.com/dispatch)
    #[arg(long)]
    pub repository: String,
    /// python3, nodejs or exec; default: from the file's extension
    #[arg(long, value_parser = ["python3", "nodejs", "exec"])]
    pub language: Option<String>,
    /// module.function (Python), file.export (Node), program (exec); default: from the source
    #[arg(long)]
    pub handler: Option<String>,
    /// requirements.txt (Python) or package.json (Node) to install into the image
    #[arg(long, value_name = "FILE")]
    pub dependencies: Option<PathBuf>,
    /// The base's Python X.Y (default: its PYTHON_VERSION variable)
    #[arg(long)]
    pub python_version: Option<String>,
    /// Package index for pip (--index-url) or npm (--registry)
    #[arg(long, env = "PIP_INDEX_URL")]
    pub index_url: Option<String>,
    /// A registry (host:port) reached over plain HTTP; repeatable
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Docker config with registry credentials ({"auths": {...}})
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Output format: text or json
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

impl K8s {
    pub async fn run(self) -> Result<ExitCode> {
        match self.what {
            K8sWhat::Crds => {
                let mut out = String::new();
                for crd in dispatch_k8s::crds() {
                    out.push_str("---\n");
                    out.push_str(&serde_saphyr::to_string(&serde_json::to_value(crd)?)?);
                }
                print!("{out}");
            }
            K8sWhat::Image(args) => args.run().await?,
            K8sWhat::Manifests(m) => {
                dispatch_core::names::validate_name("namespace", &m.namespace)
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                let install = dispatch_k8s::install::Install {
                    namespace: m.namespace.clone(),
                    image: m.image.clone(),
                    registry: m.registry.clone(),
                    insecure_registries: m.insecure_registry.clone(),
                    registry_secret: m.registry_secret.clone(),
                    knative: m.knative,
                    storage: m.storage.clone(),
                    database_secret: m.database_secret.clone(),
                    replicas: m.replicas,
                };
                let mut command = format!(
                    "dispatch k8s manifests --image {} --registry {}",
                    m.image, m.registry
                );
                if m.namespace != "dispatch" {
                    command.push_str(&format!(" --namespace {}", m.namespace));
                }
                for r in &m.insecure_registry {
                    command.push_str(&format!(" --insecure-registry {r}"));
                }
                if m.knative {
                    command.push_str(" --knative");
                }
                if let Some(db) = &m.database_secret {
                    command.push_str(&format!(
                        " --database-secret {db} --replicas {}",
                        m.replicas
                    ));
                }
                print!(
                    "{}",
                    dispatch_k8s::install::yaml(
                        &install,
                        &format!("Made by: {command}\nApply: kubectl apply -f <this file>")
                    )
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Registry access for image pushes: plain-HTTP registries, and credentials from a Docker
/// config (`file`, else `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` if present).
pub fn registry_options(
    insecure: &[String],
    file: Option<&std::path::Path>,
) -> Result<RegistryOptions> {
    let mut options = RegistryOptions {
        insecure: insecure.to_vec(),
        ..Default::default()
    };
    let file = match file {
        Some(f) => Some(f.to_path_buf()),
        None => std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
            })
            .filter(|f| f.is_file()),
    };
    if let Some(f) = file {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        options
            .add_docker_config(&bytes)
            .with_context(|| format!("{}", f.display()))?;
    }
    Ok(options)
}

impl ImageArgs {
    fn language(&self) -> Result<Language> {
        if let Some(l) = &self.language {
            return Language::parse(l).context("unknown language");
        }
        match self.path.extension().and_then(|e| e.to_str()) {
            Some("py") => Ok(Language::Python3),
            Some("js") => Ok(Language::Nodejs),
            _ => bail!(
                "cannot tell the language of {}: give --language python3, nodejs or exec",
                self.path.display()
            ),
        }
    }

    async fn run(self) -> Result<()> {
        dispatch_client::install_crypto_provider();
        let language = self.language()?;
        dispatch_core::names::validate_name("function", &self.name)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let archive = dispatch_client::pack::pack_path(&self.path)
            .with_context(|| format!("packing {}", self.path.display()))?;
        let dependencies = match &self.dependencies {
            Some(f) => Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            ),
            None => None,
        };
        let runner = std::env::current_exe().context("finding this dispatch binary")?;
        let digest = dispatch_core::digest::sha256_parts([
            archive.as_slice(),
            language.as_str().as_bytes(),
            self.handler.as_deref().unwrap_or("").as_bytes(),
            dependencies.as_deref().unwrap_or("").as_bytes(),
            self.base.as_bytes(),
            env!("CARGO_PKG_VERSION").as_bytes(),
        ]);
        let registry = Registry::new(registry_options(
            &self.insecure_registry,
            self.docker_config.as_deref(),
        )?);
        let f = ImageRequest {
            name: self.name.clone(),
            language,
            handler: self.handler.clone(),
            archive: Arc::new(archive),
            base: self.base.clone(),
            repository: self.repository.clone(),
            digest,
            dependencies,
            python_version: self.python_version.clone(),
            index_url: self.index_url.clone(),
            runner,
        };
        let json = self.output == "json";
        let progress = |s: &str| {
            if !json {
                eprintln!("{s}…");
            }
        };
        let pushed = dispatch_k8s::image::build(&registry, &f, &progress)
            .await?
            .pushed;
        if json {
            println!("{}", serde_json::to_string_pretty(&pushed)?);
        } else {
            println!("{}", pushed.reference);
            eprintln!(
                "{} blobs pushed ({} bytes), {} mounted, {} already there; manifest {}",
                pushed.blobs_pushed,
                pushed.bytes_pushed,
                pushed.blobs_mounted,
                pushed.blobs_present,
                if pushed.manifest_pushed {
                    "pushed"
                } else {
                    "unchanged"
                }
            );
        }
        Ok(())
    }
}
