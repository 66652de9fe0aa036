//! The test API server: a real kube-apiserver + etcd on loopback (`scripts/apiserver.sh`),
//! with our CRDs and the third-party ones installed, and the operator run against it.

#![allow(dead_code)] // each test binary uses part of the harness

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::Value;
use tessera_operator::api::{config_crd, service_crd, Condition, LLMInferenceService};
use tessera_operator::controller::{self, Metrics, Settings};
use tessera_operator::template::GlobalConfig;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vendored upstream files (`operator/tests/fixtures`, see its README).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Start (or reuse) the API server and install the CRDs, once per test binary.
pub fn kubeconfig() -> &'static Path {
    static ONCE: OnceLock<PathBuf> = OnceLock::new();
    ONCE.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(repo().join("scripts/apiserver.sh"))
            .arg("start")
            .output()
            .expect("run scripts/apiserver.sh");
        assert!(out.status.success(), "apiserver.sh start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim());
        assert!(path.is_file(), "no kubeconfig at {}", path.display());
        let p = path.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(install_crds(&p));
        })
        .join()
        .expect("install CRDs");
        path
    })
}

pub async fn client() -> Client {
    let path = kubeconfig();
    let kc = Kubeconfig::read_from(path).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(cfg).expect("client")
}

/// What kube-apiserver 1.20 cannot take: CEL rules (`x-kubernetes-validations`, newer than
/// 1.20) and empty-string defaults (1.20 reads `default: ""` as null and refuses the CRD; a
/// list-map key that loses its default becomes required instead).
pub fn strip_cel(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("x-kubernetes-validations");
            let keys: Vec<String> = o
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                .unwrap_or_default();
            if let Some(items) = o.get_mut("items") {
                for k in keys {
                    if items["properties"][&k]["default"] == "" {
                        match items.get_mut("required").and_then(Value::as_array_mut) {
                            Some(r) if !r.contains(&Value::from(k.as_str())) => r.push(k.into()),
                            Some(_) => {}
                            None => items["required"] = serde_json::json!([k]),
                        }
                    }
                }
            }
            if o.get("default") == Some(&Value::String(String::new())) {
                o.remove("default");
            }
            o.values_mut().for_each(strip_cel);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_cel),
        _ => {}
    }
}

async fn install_crds(kubeconfig: &Path) {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    let client = Client::try_from(cfg).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let mut crds: Vec<Value> =
        vec![serde_json::to_value(service_crd()).unwrap(), serde_json::to_value(config_crd()).unwrap()];
    let third_party = fixtures().join("crds");
    for e in std::fs::read_dir(&third_party).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(d).unwrap();
                if v["kind"] == "CustomResourceDefinition" {
                    crds.push(v);
                }
            }
        }
    }
    for mut crd in crds {
        strip_cel(&mut crd);
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(&name, &PatchParams::apply("tessera-tests").force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("install CRD {name}: {e}"));
    }
    eventually("CRDs established", Duration::from_secs(60), || async {
        let list = api.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
            })
            .then_some(())
    })
    .await;
}

/// What kube-apiserver 1.20 cannot take in a pod spec: gRPC probes (Kubernetes 1.27; the
/// scheduler preset's picker uses them) become TCP probes on the same port.
pub fn downgrade_probes(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for key in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(port) = o.get(key).and_then(|p| p.get("grpc")).and_then(|g| g.get("port")).cloned() {
                    let probe = o[key].as_object_mut().unwrap();
                    probe.remove("grpc");
                    probe.insert("tcpSocket".into(), serde_json::json!({ "port": port }));
                }
            }
            o.values_mut().for_each(downgrade_probes);
        }
        Value::Array(a) => a.iter_mut().for_each(downgrade_probes),
        _ => {}
    }
}

/// The shipped presets, as the operator installs them, with [`downgrade_probes`] applied.
pub async fn install_presets(client: &Client, ns: &str) {
    let api: Api<tessera_operator::api::LLMInferenceServiceConfig> = Api::namespaced(client.clone(), ns);
    for p in tessera_operator::presets::shipped("tessera:test").expect("presets") {
        let mut v = serde_json::to_value(&p).unwrap();
        downgrade_probes(&mut v);
        let name = p.metadata.name.clone().unwrap();
        api.patch(&name, &PatchParams::apply(controller::MANAGER).force(), &Patch::Apply(&v))
            .await
            .unwrap_or_else(|e| panic!("install preset {name}: {e}"));
    }
}

/// Poll `f` until it yields `Some`, or panic after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A test's own namespace with the operator (presets installed there) watching it.
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub metrics: Arc<Metrics>,
    controller: tokio::task::JoinHandle<()>,
}

impl Env {
    pub async fn new(test: &str) -> Env {
        let client = client().await;
        let ns = format!("{test}-{}", std::process::id());
        let nss: Api<Namespace> = Api::all(client.clone());
        let obj: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
        match nss.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create namespace {ns}: {e}"),
        }
        install_presets(&client, &ns).await;
        let metrics = Arc::new(Metrics::default());
        let controller = Self::spawn(&client, &ns, metrics.clone());
        Env { client, ns, metrics, controller }
    }

    fn spawn(client: &Client, ns: &str, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
        let settings = Settings {
            namespaces: vec![ns.to_string()],
            system_namespace: ns.to_string(),
            // Each test's default Gateway is its own (`gateway` in its namespace).
            global: GlobalConfig { ingress_gateway_name: "gateway".into(), ingress_gateway_namespace: ns.into() },
            installed: None,
        };
        tokio::spawn(controller::run(client.clone(), settings, metrics))
    }

    /// Stop the operator and start a fresh one (with fresh metrics).
    pub async fn restart_controller(&mut self) {
        self.controller.abort();
        let _ = (&mut self.controller).await;
        self.metrics = Arc::new(Metrics::default());
        self.controller = Self::spawn(&self.client, &self.ns, self.metrics.clone());
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Create (server-side apply) an object from JSON in this namespace.
    pub async fn apply<K>(&self, v: Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        self.api::<K>().patch(&name, &PatchParams::apply("tessera-tests").force(), &Patch::Apply(&v)).await.unwrap()
    }

    /// Wait until the service's condition `ty` satisfies `pred`; returns it.
    pub async fn condition(&self, svc: &str, ty: &str, pred: impl Fn(&Condition) -> bool) -> Condition {
        let api = self.api::<LLMInferenceService>();
        eventually(&format!("{svc}: condition {ty}"), Duration::from_secs(30), || async {
            let s = api.get(svc).await.ok()?;
            let c = s.status?.conditions?.into_iter().find(|c| c.type_ == ty)?;
            pred(&c).then_some(c)
        })
        .await
    }

    pub fn reconciles(&self) -> u64 {
        let ok = self.metrics.reconciles.get_or_create(&vec![("result".into(), "ok".into())]).get();
        let err = self.metrics.reconciles.get_or_create(&vec![("result".into(), "error".into())]).get();
        ok + err
    }
}

/// Every kind the operator creates.
fn child_kinds() -> [kube::core::ApiResource; 9] {
    use tessera_operator::kinds;
    [
        kinds::deployment(),
        kinds::service(),
        kinds::service_account(),
        kinds::role(),
        kinds::role_binding(),
        kinds::lws(),
        kinds::http_route(),
        kinds::pool_alpha(),
        kinds::pool_v1(),
    ]
}

impl Env {
    /// An untyped API for `ar` in this namespace.
    pub fn dynamic(&self, ar: &kube::core::ApiResource) -> Api<kube::api::DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, ar)
    }

    /// Wait for the object `name` of kind `ar` to satisfy `pred`.
    pub async fn object(
        &self,
        ar: &kube::core::ApiResource,
        name: &str,
        pred: impl Fn(&kube::api::DynamicObject) -> bool,
    ) -> kube::api::DynamicObject {
        let api = self.dynamic(ar);
        eventually(&format!("{} {name}", ar.kind), Duration::from_secs(30), || async {
            api.get_opt(name).await.ok().flatten().filter(|o| pred(o))
        })
        .await
    }

    /// Merge-patch the status of object `name` of kind `ar`.
    pub async fn patch_status(&self, ar: &kube::core::ApiResource, name: &str, status: Value) {
        let p = serde_json::json!({ "status": status });
        self.dynamic(ar)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&p))
            .await
            .unwrap_or_else(|e| panic!("patch status of {} {name}: {e}", ar.kind));
    }

    /// The names of every object of the kinds the operator creates in this namespace, as
    /// `Kind/name` (sorted), to compare a whole namespace with what a step should leave.
    pub async fn inventory(&self) -> Vec<String> {
        let mut out = vec![];
        for ar in child_kinds() {
            let list = self.dynamic(&ar).list(&Default::default()).await.unwrap();
            for o in list.items {
                let name = o.metadata.name.clone().unwrap_or_default();
                // The namespace's own default ServiceAccount is not ours.
                if !(ar.kind == "ServiceAccount" && name == "default") {
                    let group = if ar.group.is_empty() { String::new() } else { format!(".{}", ar.group) };
                    out.push(format!("{}{group}/{name}", ar.kind));
                }
            }
        }
        out.sort();
        out
    }

    /// Every object [`Env::inventory`] lists, and the services, as JSON (with resource versions).
    pub async fn versions(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        let svc = kube::core::ApiResource::erase::<LLMInferenceService>(&());
        for ar in std::iter::once(svc).chain(child_kinds()) {
            for o in self.dynamic(&ar).list(&Default::default()).await.unwrap().items {
                let name = format!("{}/{}", ar.kind, o.metadata.name.clone().unwrap_or_default());
                out.push((name, serde_json::to_string_pretty(&o).unwrap()));
            }
        }
        out.sort();
        out
    }

    /// Idempotence: once the objects settle, a fresh operator reconciles them all again and
    /// writes nothing.
    pub async fn assert_second_reconcile_writes_nothing(&mut self) {
        // Settled: unchanged over 2 s (the operator's reaction to the test's own status
        // patches, which re-applies once on 1.20, must be over before the restart).
        let mut before = self.versions().await;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = self.versions().await;
            if now == before {
                break;
            }
            before = now;
        }
        self.restart_controller().await;
        eventually("a reconcile by the new operator", Duration::from_secs(30), || async {
            (self.reconciles() >= 1).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = self.versions().await;
        for ((name, a), (_, b)) in after.iter().zip(&before) {
            assert!(a == b, "the second reconcile wrote {name}:\nbefore {b}\nafter {a}");
        }
        assert_eq!(after.len(), before.len(), "the second reconcile created or deleted something");
    }

    /// Wait until [`Env::inventory`] equals `want` (sorted here).
    pub async fn expect_inventory(&self, step: &str, want: &[String]) {
        let mut want = want.to_vec();
        want.sort();
        let mut last = vec![];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            last = self.inventory().await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("{step}: the namespace holds\n{last:#?}\nbut should hold\n{want:#?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.controller.abort();
    }
}
