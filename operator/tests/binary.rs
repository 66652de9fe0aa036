//! `tessera-operator run` as a process against the test API server: installs the presets,
//! reconciles a service, and serves `/healthz` and `/metrics` with reconcile counts.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use support::eventually;
use tessera_operator::api::{LLMInferenceService, LLMInferenceServiceConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_subcommand_reconciles_and_exports_metrics() {
    let client = support::client().await;
    let ns = format!("binary-{}", std::process::id());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    let _ = Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &obj).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(["run", "--namespace", &ns, "--system-namespace", &ns, "--worker-image", "example/tessera:1"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", support::kubeconfig())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tessera-operator");

    let configs: Api<LLMInferenceServiceConfig> = Api::namespaced(client.clone(), &ns);
    eventually("presets installed", Duration::from_secs(30), || async {
        (configs.list(&Default::default()).await.ok()?.items.len() == 11).then_some(())
    })
    .await;
    let svc = json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
                     "metadata": {"name": "b"}, "spec": {"model": {"uri": "hf://org/m"}}});
    Api::<LLMInferenceService>::namespaced(client.clone(), &ns)
        .patch("b", &PatchParams::apply("tessera-tests"), &Patch::Apply(&svc))
        .await
        .unwrap();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = eventually("Deployment b-kserve", Duration::from_secs(30), || async {
        deps.get_opt("b-kserve").await.ok().flatten()
    })
    .await;
    let image = d.spec.template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("example/tessera:1"), "the --worker-image reaches the presets");

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let ok = metrics
        .lines()
        .find(|l| l.starts_with("tessera_operator_reconcile_total{result=\"ok\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert!(ok.is_some_and(|n| n >= 1), "{metrics}");
}

/// `tessera-operator crd | head -n 1` and `presets | head -n 1`: the output ends quietly when
/// the reader goes away (exit 0, no panic), as a command in a pipe should.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::BufRead;
    for args in [&["crd"][..], &["presets", "--worker-image", "x/tessera:1"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tessera-operator");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("first line");
        // The reader is dropped here: the rest of the output meets a closed pipe.
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty(), "{args:?} printed a first line");
        assert!(out.status.success(), "{args:?} exits 0 after its reader went away: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
