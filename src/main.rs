//! DeskVM: a desktop virtual-machine manager with its own KVM engine.
#![forbid(unsafe_code)]

mod app;
mod cli;
mod library;

use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // No arguments, or `gui`: the desktop app.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || (args.len() == 1 && args[0] == "gui") {
        // Before GTK starts and before any other thread exists.
        if let Some(renderer) = app::host::preferred_gsk_renderer(
            std::env::var_os("GSK_RENDERER").as_deref(),
            std::env::var_os("LIBGL_ALWAYS_SOFTWARE").as_deref(),
            std::path::Path::new("/dev/dri"),
            std::path::Path::new("/dev/nvidia0"),
        ) {
            std::env::set_var("GSK_RENDERER", renderer);
        }
        app::run();
        return;
    }
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        Some(cli::Command::Run(args)) => cli::run(args),
        Some(cli::Command::List) => cli::list(),
        Some(cli::Command::Disk(command)) => cli::disk(command),
        None => cli::list(),
    };
    if let Err(e) = result {
        eprintln!("deskvm: error: {e}");
        std::process::exit(1);
    }
}
