//! DeskVM: a desktop virtual-machine manager with its own KVM engine.
#![forbid(unsafe_code)]

mod cli;
mod library;

use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        Some(cli::Command::Run(args)) => cli::run(args),
        Some(cli::Command::List) => cli::list(),
        Some(cli::Command::Disk(command)) => cli::disk(command),
        None => {
            // The graphical app arrives with the desktop-app issue; until then say so.
            eprintln!("deskvm: the graphical window is not built yet; use `deskvm run --help` or `deskvm list`");
            cli::list()
        }
    };
    if let Err(e) = result {
        eprintln!("deskvm: error: {e}");
        std::process::exit(1);
    }
}
