//! `vsmconnect`: open your remote desktop from your own machine.
use std::process::ExitCode;

fn main() -> ExitCode {
    vsm::cli::vsmconnect::main()
}
