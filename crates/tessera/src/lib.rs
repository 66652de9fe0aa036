//! The `tessera` binary's wiring, as a library so tests can start a whole worker in-process.
//!
//! Owns: flags ([`args`]) → validated settings, device/dtype choice, model loading order,
//! KV cache sizing, starting the HTTP server before the model is ready (so `/health` says
//! 503 while loading), signal handling.
//! Must not touch: model math, scheduling or request handling (those crates own them).

pub mod args;
mod error;
mod serve;

pub use error::ServeError;
pub use serve::{launch, load_model, Running};

/// Run a parsed command line to completion.
pub fn run(cli: args::Cli) -> Result<(), ServeError> {
    match cli.command {
        args::Command::ExportHf { gguf, out_dir } => {
            tessera_loader::export_hf(&gguf, &out_dir)?;
            tracing::info!("wrote a Hugging Face copy of {} to {}", gguf.display(), out_dir.display());
            Ok(())
        }
        args::Command::Serve(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ServeError::Io)?;
            rt.block_on(async move {
                let running = launch(*a).await?;
                running.wait_for_signal().await
            })
        }
    }
}
