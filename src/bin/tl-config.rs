//! `tl-config`: read and write vsm configuration keys by path. All logic lives in
//! `vsm::config::cli`.

use clap::Parser;

fn main() {
    let args = vsm::config::cli::Args::parse();
    let code = vsm::config::cli::run(&args, &mut std::io::stdout(), &mut std::io::stderr());
    std::process::exit(i32::from(code));
}
