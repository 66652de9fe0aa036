//! Every sample KServe ships (`fixtures/kserve/samples`) applied with kubectl to the real API
//! server, each in its own namespace (two pairs share a name): the operator creates exactly
//! the objects the contract names for its topology — the table in `docs/operator.md`.

mod support;

use support::Env;

const LWS: &str = "LeaderWorkerSet.leaderworkerset.x-k8s.io";
const ROUTE: &str = "HTTPRoute.gateway.networking.k8s.io";

fn kubectl(env: &Env, args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", support::kubeconfig())
        .args(args)
        .output()
        .expect("run kubectl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubectl {args:?} in {}: {text}", env.ns);
    text
}

/// `Kind/<svc><suffix>` for each entry.
fn objects(svc: &str, parts: &[(&str, &str)]) -> Vec<String> {
    parts.iter().map(|(k, s)| format!("{k}/{svc}{s}")).collect()
}

/// The router set: route to the pool, both pool API levels, and the endpoint picker.
fn router_set(svc: &str) -> Vec<String> {
    objects(
        svc,
        &[
            (ROUTE, "-kserve-route"),
            ("InferencePool.inference.networking.x-k8s.io", "-inference-pool"),
            ("InferencePool.inference.networking.k8s.io", "-inference-pool"),
            ("Deployment.apps", "-kserve-router-scheduler"),
            ("Service", "-epp-service"),
            ("ServiceAccount", "-epp-sa"),
            ("Role.rbac.authorization.k8s.io", "-epp-role"),
            ("RoleBinding.rbac.authorization.k8s.io", "-epp-rb"),
        ],
    )
}

async fn check(sample: &str, svc: &str, mut want: Vec<String>, user: &[&str]) {
    let test = sample.rsplit('/').next().unwrap().trim_end_matches(".yaml").replace("llm-inference-service-", "");
    let env = Env::new(test[..test.len().min(40)].trim_end_matches('-')).await;
    for u in user {
        kubectl(&env, &["-n", &env.ns, "create", "serviceaccount", u]);
    }
    let path = support::fixtures().join("kserve/samples").join(sample);
    kubectl(&env, &["-n", &env.ns, "apply", "-f", path.to_str().unwrap()]);
    want.extend(user.iter().map(|u| format!("ServiceAccount/{u}")));
    env.expect_inventory(sample, &want).await;
    env.condition(svc, "PresetsCombined", |c| c.status == "True").await;
}

fn deployment_set(svc: &str, prefill: bool) -> Vec<String> {
    let mut v = objects(svc, &[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc")]);
    if prefill {
        v.extend(objects(svc, &[("Deployment.apps", "-kserve-prefill"), ("Service", "-kserve-prefill-workload-svc")]));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_125m_cpu_samples() {
    let svc = "facebook-opt-125m-single";
    let mut no_scheduler = deployment_set(svc, false);
    no_scheduler.push(format!("{ROUTE}/{svc}-kserve-route"));
    check("opt-125m-cpu/llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml", svc, no_scheduler, &[]).await;
    let mut full = deployment_set(svc, false);
    full.extend(router_set(svc));
    check("opt-125m-cpu/llm-inference-service-facebook-opt-125m-cpu.yaml", svc, full, &[]).await;
    let svc = "facebook-opt-125m-pd";
    let mut pd = deployment_set(svc, true);
    pd.extend(router_set(svc));
    check("opt-125m-cpu/llm-inference-service-pd-facebook-opt-125m-cpu.yaml", svc, pd, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_gpu_and_kv_cache_routing_samples() {
    for (sample, svc, prefill, scheduler) in [
        ("single-node-gpu/llm-inference-service-qwen2-7b-gpu.yaml", "qwen2-7b-instruct-single", false, true),
        (
            "single-node-gpu/llm-inference-service-qwen2-7b-gpu-no-scheduler.yaml",
            "qwen2-7b-instruct-single-no-scheduler",
            false,
            false,
        ),
        ("single-node-gpu/llm-inference-service-pd-qwen2-7b-gpu.yaml", "qwen2-7b-instruct-pd", true, true),
        (
            "precise-prefix-kv-cache-routing/llm-inference-service-qwen2-7b-gpu-kv-cache-routing.yaml",
            "qwen2-7b-kv-cache-routing",
            false,
            true,
        ),
    ] {
        let mut want = deployment_set(svc, prefill);
        match scheduler {
            true => want.extend(router_set(svc)),
            false => want.push(format!("{ROUTE}/{svc}-kserve-route")),
        }
        check(sample, svc, want, &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek_multi_node_samples_and_the_network_sample() {
    let dir = "deepseek-r1-gpu-rdma-roce";
    for (file, svc, prefill) in [
        ("llm-inference-service-dp-ep-deepseek-r1-gpu-deepep-ht.yaml", "deepseek-r1-0528", false),
        ("llm-inference-service-dp-ep-deepseek-r1-gpu-naive.yaml", "deepseek-coder-v2", false),
        ("llm-inference-service-dp-ep-deepseek-r1-pd-gpu-p-deepep-ht-d-deepep-ht.yaml", "deepseek-r1-0528-pd", true),
        ("llm-inference-service-dp-ep-deepseek-r1-pd-gpu-p-deepep-ht-d-pplx.yaml", "deepseek-r1-0528-pd", true),
    ] {
        // The pods run as the user's `hfsa`, so no group account is made.
        let mut want = objects(svc, &[(LWS, "-kserve-mn"), ("Service", "-kserve-workload-svc")]);
        if prefill {
            want.extend(objects(svc, &[(LWS, "-kserve-mn-prefill"), ("Service", "-kserve-prefill-workload-svc")]));
        }
        want.extend(router_set(svc));
        check(&format!("{dir}/{file}"), svc, want, &["hfsa"]).await;
    }
}

/// `network-roce.yaml` holds SR-IOV objects for its own namespace, not a service (so nothing
/// for the operator): with their CRDs installed (stubs taking any object) it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_sample_applies_and_concerns_no_service() {
    let env = Env::new("roce").await;
    let mut stubs = String::new();
    for (kind, plural) in [("SriovNetworkNodePolicy", "sriovnetworknodepolicies"), ("SriovNetwork", "sriovnetworks")] {
        stubs.push_str(&format!(
            "---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: \
             {plural}.sriovnetwork.openshift.io\nspec:\n  group: sriovnetwork.openshift.io\n  scope: Namespaced\n  \
             names: {{kind: {kind}, plural: {plural}}}\n  versions:\n  - name: v1\n    served: true\n    storage: \
             true\n    schema:\n      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("tessera-sriov-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crds = dir.join("crds.yaml");
    std::fs::write(&crds, stubs).unwrap();
    kubectl(&env, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(&env, &["wait", "--for=condition=Established", "crd/sriovnetworks.sriovnetwork.openshift.io"]);
    kubectl(&env, &["wait", "--for=condition=Established", "crd/sriovnetworknodepolicies.sriovnetwork.openshift.io"]);
    let ns = "openshift-sriov-network-operator";
    let _ = std::process::Command::new("kubectl")
        .env("KUBECONFIG", support::kubeconfig())
        .args(["create", "namespace", ns])
        .output();
    let path = support::fixtures().join("kserve/samples/deepseek-r1-gpu-rdma-roce/network-roce.yaml");
    let out = kubectl(&env, &["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(out.lines().filter(|l| l.starts_with("sriovnetwork")).count(), 4, "{out}");
    let listed = kubectl(&env, &["-n", ns, "get", "sriovnetworks,sriovnetworknodepolicies", "-o", "name"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
}
