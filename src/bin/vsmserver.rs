//! `vsmserver`: the master daemon, and `vsmserver demo`, the two-master demonstration.
use std::process::ExitCode;

fn main() -> ExitCode {
    vsm::cli::vsmserver::main()
}
