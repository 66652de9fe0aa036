//! The `tessera` binary, built inside this package so its tests can run it as a process
//! (`CARGO_BIN_EXE_tessera-worker`).

fn main() -> std::process::ExitCode {
    tessera::main_entry()
}
