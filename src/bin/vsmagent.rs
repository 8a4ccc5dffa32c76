//! `vsmagent`: the agent daemon. All logic lives in `vsm::cli::vsmagent`.
use std::process::ExitCode;

fn main() -> ExitCode {
    vsm::cli::vsmagent::main()
}
