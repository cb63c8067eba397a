use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nsbridge::settings::Settings;

mod app;

/// Nightscout's APIv3 `/storage` Socket.IO channel, fed by MongoDB change streams.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML) layered over the built-in defaults.
    #[arg(long, env = "NSBRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Print the effective settings (secrets redacted) and exit: 0 if usable, 2 if not.
    CheckConfig,
}

/// Exit status for settings that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => match Settings::load_redacted(cli.config.as_deref(), &env) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(e),
        },
        Command::Run => {
            let settings = match Settings::load(cli.config.as_deref(), &env) {
                Ok(settings) => settings,
                Err(e) => return bad_config(e),
            };
            nsbridge::telemetry::init_logging(&settings.log);
            match run(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn bad_config(e: nsbridge::settings::SettingsError) -> ExitCode {
    eprintln!("nsbridge: bad configuration: {e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn run(settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(app::run(settings))
}
