//! Every child object a service's effective spec asks for, built before anything is written
//! (nothing is created from a spec that cannot be rendered whole).

use kube::api::DynamicObject;
use kube::Client;

use crate::api::{LLMInferenceService, LLMInferenceServiceSpec};
use crate::children::{self, Child};
use crate::kinds::{self, Installed};
use crate::names::Role;
use crate::{multinode, render, router, Error};

/// The children of `svc` with effective spec `spec`.
pub fn children(
    svc: &LLMInferenceService,
    spec: &LLMInferenceServiceSpec,
    installed: Installed,
) -> Result<Vec<Child>, Error> {
    let mut out = vec![];
    if spec.workload.worker.is_some() {
        if !installed.lws {
            return Err(Error::not_installed("LeaderWorkerSet", "spec.worker"));
        }
        out.extend(multinode::children(svc, spec, &spec.workload, render::main_role(spec))?);
    } else {
        out.push(Child::typed(&render::main_deployment(svc, spec)?)?);
    }
    out.push(Child::typed(&render::workload_service(svc, spec))?);
    if let Some(p) = &spec.prefill {
        if p.worker.is_some() {
            if !installed.lws {
                return Err(Error::not_installed("LeaderWorkerSet", "spec.prefill.worker"));
            }
            out.extend(multinode::children(svc, spec, p, Role::Prefill)?);
        } else if let Some(d) = render::prefill_deployment(svc, spec)? {
            out.push(Child::typed(&d)?);
        }
        out.push(Child::typed(&render::prefill_service(svc))?);
    }
    out.extend(router::children(svc, spec, installed)?);
    Ok(out)
}

/// The contract's "the group size may not change": a wanted LeaderWorkerSet whose live
/// group size differs is refused (delete and recreate the service to resize a group).
pub async fn check_group_sizes(client: &Client, ns: &str, wanted: &[Child]) -> Result<(), Error> {
    for c in wanted.iter().filter(|c| c.ar.kind == kinds::lws().kind) {
        let live: Option<DynamicObject> = children::api(client, ns, &c.ar).get_opt(c.name()).await?;
        let (want, have) = (multinode::live_size(&c.obj), live.as_ref().and_then(multinode::live_size));
        if let (Some(want), Some(have)) = (want, have) {
            if want != have {
                return Err(Error::Immutable(format!(
                    "the group size of LeaderWorkerSet {} may not change (live {have}, wanted {want}); delete and \
                     recreate the service to resize its groups",
                    c.name()
                )));
            }
        }
    }
    Ok(())
}
