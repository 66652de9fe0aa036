//! `tessera`: the worker binary (`serve`, `export-hf`).

fn main() -> std::process::ExitCode {
    tessera::main_entry()
}
