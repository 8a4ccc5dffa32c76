//! `vsmclient`: ask the master for a desktop session.
use std::process::ExitCode;

fn main() -> ExitCode {
    vsm::cli::vsmclient::main()
}
