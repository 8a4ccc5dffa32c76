//! `tlctl`: sessions, agent load and HA state for administrators.
use std::process::ExitCode;

fn main() -> ExitCode {
    vsm::cli::tlctl::main()
}
