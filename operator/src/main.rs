//! The operator binary.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Crd => print!("{}", tessera_operator::api::crds_yaml()?),
    }
    Ok(())
}
