//! The `tessera` binary's wiring, as a library so tests can start a whole worker in-process.
//!
//! Owns: flags ([`args`]) → validated settings, device/dtype choice, model loading order,
//! KV cache sizing, starting the HTTP server before the model is ready (so `/health` says
//! 503 while loading), signal handling.
//! Must not touch: model math, scheduling or request handling (those crates own them).

pub mod args;
mod dp;
mod embed;
mod error;
pub mod kv_transfer;
pub mod lora;
pub mod ranks;
mod serve;
mod sizing;
pub mod tls;

pub use dp::{is_replica_pod, run_replica_pod};
pub use error::ServeError;
pub use serve::{is_worker_pod, launch, load_model, run_worker_pod, Running};

/// The whole binary: parse `std::env::args`, set up logging, run, map errors to the exit code.
/// (Shared by `tessera` and the test harness's copy of it.)
pub fn main_entry() -> std::process::ExitCode {
    use clap::Parser;
    let cli = args::Cli::parse_from(args::normalize_argv(std::env::args()));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Run a parsed command line to completion.
pub fn run(cli: args::Cli) -> Result<(), ServeError> {
    if let args::Command::Serve(a) = &cli.command {
        // Every serving role (HTTP leader, headless rank or replica pod) computes on this pool.
        serve::configure_threads(a.threads);
    }
    match cli.command {
        args::Command::ExportHf { gguf, out_dir } => {
            tessera_loader::export_hf(&gguf, &out_dir)?;
            tracing::info!("wrote a Hugging Face copy of {} to {}", gguf.display(), out_dir.display());
            Ok(())
        }
        args::Command::Fetch { uri, dir } => {
            tessera_source::fetch(&uri, &dir, &tessera_source::SourceOptions::new(None))?;
            Ok(())
        }
        args::Command::Serve(a) if is_replica_pod(&a) => run_replica_pod(&a),
        args::Command::Serve(a) if is_worker_pod(&a)? => run_worker_pod(&a),
        args::Command::Serve(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ServeError::Io)?;
            rt.block_on(async move {
                let running = launch(*a).await?;
                running.wait_for_signal().await
            })
        }
    }
}
