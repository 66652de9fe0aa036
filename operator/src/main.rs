//! The operator binary: `crd`, `presets` and `run`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::routing::get;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tessera_operator::controller::{self, Metrics, Settings};
use tessera_operator::template::GlobalConfig;

#[derive(Parser)]
#[command(name = "tessera-operator", version, about = "Operator for KServe LLMInferenceService on Tessera")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CRDs (YAML).
    Crd,
    /// Print the well-known presets (YAML) with the given worker image.
    Presets {
        #[arg(long, default_value = "ghcr.io/tessera-ai/tessera:latest")]
        worker_image: String,
    },
    /// Print the ClusterRole with the least RBAC the operator needs (YAML).
    Rbac {
        #[arg(long, default_value = "tessera-operator")]
        name: String,
    },
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespace to watch (repeatable); all namespaces when not given.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Where presets are installed and looked up after the service's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kserve")]
    system_namespace: String,
    /// The Tessera worker image the presets run.
    #[arg(long, env = "TESSERA_WORKER_IMAGE", default_value = "ghcr.io/tessera-ai/tessera:latest")]
    worker_image: String,
    /// Do not install (server-side apply) the presets at start-up.
    #[arg(long)]
    no_install_presets: bool,
    /// `/metrics` and `/healthz` listen here.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "kserve-ingress-gateway")]
    ingress_gateway_name: String,
    #[arg(long, default_value = "kserve")]
    ingress_gateway_namespace: String,
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    registry.register("tessera_operator_reconcile", "Reconciles by result", metrics.reconciles.clone());
    let registry = Arc::new(registry);
    let app = axum::Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &registry) {
                    Ok(()) => (axum::http::StatusCode::OK, out),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connect to the Kubernetes API")?;
    if !args.no_install_presets {
        let n = controller::install_presets(&client, &args.system_namespace, &args.worker_image)
            .await
            .with_context(|| format!("install presets into namespace {}", args.system_namespace))?;
        tracing::info!(n, namespace = %args.system_namespace, "presets installed");
    }
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(serve_metrics(args.metrics_addr, metrics.clone()));
    let settings = Settings {
        namespaces: args.namespaces,
        system_namespace: args.system_namespace,
        global: GlobalConfig {
            ingress_gateway_name: args.ingress_gateway_name,
            ingress_gateway_namespace: args.ingress_gateway_namespace,
        },
        installed: None,
    };
    tokio::select! {
        _ = controller::run(client, settings, metrics) => Ok(()),
        r = server => r.context("metrics server")?,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Crd => {
            emit(&tessera_operator::api::crds_yaml()?)?;
        }
        Cmd::Presets { worker_image } => {
            emit(&tessera_operator::presets::shipped_yaml(&worker_image)?)?;
        }
        Cmd::Rbac { name } => {
            emit(&serde_yaml::to_string(&tessera_operator::rbac::cluster_role(&name))?)?;
        }
        Cmd::Run(args) => run(args).await?,
    }
    Ok(())
}

/// Write to stdout; `false` once the reader has gone (`| head`), which ends the output quietly.
fn emit(text: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("write to stdout"),
    }
}
