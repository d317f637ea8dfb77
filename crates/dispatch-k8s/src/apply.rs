//! Applying and deleting those objects with kube: server-side apply of a function's
//! Deployment and Service (or Knative Service) with its NetworkPolicy, Jobs started and
//! cancelled.

use dispatch_core::JobExecution;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;

use crate::*;

/// The field manager of Dispatch's server-side applies.
pub const FIELD_MANAGER: &str = "dispatch";

/// Applies a function's Deployment and Service (server-side apply: creates or updates, and a
/// rebuild's new digest annotation rolls the pods).
pub async fn apply_function(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage<'_>,
) -> Result<(), kube::Error> {
    use kube::api::{Api, Patch, PatchParams};
    let (deployment, service) = function_objects(ns, name, spec, image);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let object_name = object_name(name);
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&object_name, &pp, &Patch::Apply(&deployment))
        .await?;
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(&object_name, &pp, &Patch::Apply(&service))
        .await?;
    apply_network_policy(client, ns, name, spec, &pp).await?;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns);
    match function_hpa(ns, name, spec) {
        Some(hpa) => {
            hpas.patch(&object_name, &pp, &Patch::Apply(&hpa)).await?;
        }
        // A fixed pod count now: an autoscaler from before must go.
        None => gone(
            hpas.delete(&object_name, &kube::api::DeleteParams::background())
                .await,
        )?,
    }
    Ok(())
}

/// The egress-denying NetworkPolicy of a function with `spec.network: none`, or none (an
/// earlier one deleted).
async fn apply_network_policy(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    pp: &kube::api::PatchParams,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, Patch};
    let api = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    if spec.network {
        delete_network_policy(client, ns, name).await
    } else {
        let policy = security::deny_egress(ns, name, labels(ns, name));
        api.patch(&object_name(name), pp, &Patch::Apply(&policy))
            .await?;
        Ok(())
    }
}

/// A delete's result where "not found" is success: what is gone is gone.
fn gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a function's Deployment and Service (absent ones are fine).
pub async fn delete_function(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use kube::api::{Api, DeleteParams};
    let object_name = object_name(name);
    gone(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    gone(
        Api::<Service>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    gone(
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    delete_network_policy(client, ns, name).await
}

fn knative_api(client: &kube::Client, ns: &str) -> kube::Api<kube::api::DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("serving.knative.dev", "v1", "Service");
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "services");
    kube::Api::namespaced_with(client.clone(), ns, &resource)
}

/// Applies a function's Knative Service (server-side apply; Knative rolls out the new
/// revision and routes to it once it is ready).
pub async fn apply_knative(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage<'_>,
) -> Result<(), kube::Error> {
    use kube::api::{Patch, PatchParams};
    let service = knative_service(ns, name, spec, image);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    knative_api(client, ns)
        .patch(&object_name(name), &pp, &Patch::Apply(&service))
        .await?;
    apply_network_policy(client, ns, name, spec, &pp).await
}

/// Deletes a function's Knative Service (an absent one is fine).
pub async fn delete_knative(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    gone(
        knative_api(client, ns)
            .delete(&object_name(name), &kube::api::DeleteParams::background())
            .await,
    )?;
    delete_network_policy(client, ns, name).await
}

/// Deletes a function's NetworkPolicy (an absent one is fine).
async fn delete_network_policy(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    gone(
        kube::Api::<NetworkPolicy>::namespaced(client.clone(), ns)
            .delete(&object_name(name), &kube::api::DeleteParams::background())
            .await,
    )
}

/// Starts a job execution as a `batch/v1` Job; cancelling deletes it with its pods.
pub async fn start_job(
    client: &kube::Client,
    exec: &JobExecution,
    template_uid: Option<&str>,
) -> Result<Job, kube::Error> {
    use kube::api::{Api, PostParams};
    let job = job(exec, template_uid).map_err(kube::Error::SerdeError)?;
    Api::<Job>::namespaced(client.clone(), &exec.namespace)
        .create(&PostParams::default(), &job)
        .await
}

pub async fn cancel_job(
    client: &kube::Client,
    ns: &str,
    job_name: &str,
) -> Result<(), kube::Error> {
    use kube::api::{Api, DeleteParams};
    Api::<Job>::namespaced(client.clone(), ns)
        .delete(job_name, &DeleteParams::background())
        .await
        .map(|_| ())
}
