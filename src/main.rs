use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nsbridge::settings::Settings;
use nsbridge::tenants::TenantSpec;

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
    /// Ask the bridge running with these settings whether it is ready (its `/readyz`):
    /// exit 0 if so, 1 if not. For container health checks; needs no curl.
    Healthcheck,
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
                match check_tenants(cli.config.as_deref(), &env) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("nsbridge: bad configuration: {e}");
                        ExitCode::from(EXIT_BAD_CONFIG)
                    }
                }
            }
            Err(e) => bad_config(e),
        },
        Command::Healthcheck => match Settings::load(cli.config.as_deref(), &env) {
            Ok(settings) => healthcheck(settings.listen, nsbridge::http::FRONT_DOOR_PREFIX),
            // Container runtimes reserve exit status 2: unhealthy is 1.
            Err(e) => {
                eprintln!("nsbridge: bad configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run => {
            let settings = match Settings::load(cli.config.as_deref(), &env) {
                Ok(settings) => settings,
                Err(e) => return bad_config(e),
            };
            let specs = match sites_of(&settings, &env) {
                Ok(specs) => specs,
                Err(e) => {
                    eprintln!("nsbridge: bad configuration: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            nsbridge::telemetry::init_logging(&settings.log);
            match run(settings, specs, env) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The sites to serve: the tenants file's, read and validated, or the one of the settings.
fn sites_of(settings: &Settings, env: &HashMap<String, String>) -> Result<Vec<TenantSpec>, String> {
    let Some(path) = &settings.tenants else {
        return Ok(vec![TenantSpec::single(settings)]);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("tenants file {}: {e}", path.display()))?;
    nsbridge::tenants::parse(&text, settings, &nsbridge::tenants::System(env)).map_err(|e| e.to_string())
}

/// The tenants file, when the settings name one: read and validated, and its sites listed
/// (without their secrets).
fn check_tenants(config: Option<&std::path::Path>, env: &HashMap<String, String>) -> Result<(), String> {
    let settings = Settings::load(config, env).map_err(|e| e.to_string())?;
    let Some(path) = &settings.tenants else {
        return Ok(());
    };
    let tenants = sites_of(&settings, env)?;
    println!("\n# {} tenants in {}", tenants.len(), path.display());
    for tenant in tenants {
        println!(
            "# {}: database {}, hosts {}{}",
            tenant.name,
            tenant.database,
            tenant.hosts.join(", "),
            tenant
                .upstream
                .as_ref()
                .map_or(String::new(), |u| format!(", Nightscout at {u}"))
        );
    }
    Ok(())
}

fn bad_config(e: nsbridge::settings::SettingsError) -> ExitCode {
    eprintln!("nsbridge: bad configuration: {e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

/// `GET /readyz` on the loopback address of the listen port, with short timeouts.
fn healthcheck(listen: SocketAddr, prefix: &str) -> ExitCode {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let target = SocketAddr::new(ip, listen.port());
    match ready(target, prefix) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("nsbridge at {target} is not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nsbridge at {target} did not answer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ready(target: SocketAddr, prefix: &str) -> std::io::Result<bool> {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {prefix}/readyz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line)?;
    Ok(status_line.split_whitespace().nth(1) == Some("200"))
}

fn run(settings: Settings, specs: Vec<TenantSpec>, env: HashMap<String, String>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(app::run(settings, specs, env))
}
