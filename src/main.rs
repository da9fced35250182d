//! The `switchboard` command: parse the command line, load the config, set up
//! logging, run the engine, and turn the outcome into an exit code
//! (0 clean stop, 1 runtime failure, 2 bad config or an address in use).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::{LevelFilter, error, info, warn};
use switchboard::config::TunnelAgentConfig;
use switchboard::{Config, Engine, EngineError};

/// A single-threaded TCP gateway engine: echo, broadcast, router and tunnel roles on one poll loop.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    /// Log level: off, error, warn, info, debug, trace (debug/trace need a
    /// debug build; release builds keep info and above).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: LevelFilter,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in the config file (or the built-in loopback default).
    Run {
        /// Config file (TOML). Without it, a built-in config on loopback only.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print what would run.
    Check {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a tunnel agent, no config file needed: dial the server and expose
    /// the local service through it (see docs/PROTOCOL.md).
    Agent {
        /// The tunnel server, host:port (a name is resolved off the event loop
        /// before each dial, and every address is tried in order).
        #[arg(long, value_name = "HOST:PORT")]
        server: String,
        /// The local service streams connect to, host:port (a name is resolved
        /// off the event loop; with several addresses, a failed connect moves
        /// the next stream to the next one).
        #[arg(long, value_name = "HOST:PORT")]
        local: String,
        /// The service to ask for (default: the server's first service without a token).
        #[arg(long, value_name = "NAME", default_value = "")]
        name: String,
        /// The service's shared secret (visible in `ps`; see --token-file).
        #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the shared secret from this file (one line).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    let code = command(cli.command);
    // Lines still queued for the log writer thread reach the output first.
    switchboard::engine::flush_logs(LOG_FLUSH_AT_EXIT);
    code
}

/// How long an exiting process waits for its queued log lines.
const LOG_FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

fn command(command: Command) -> ExitCode {
    match command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}: ok\n{}", config.display(), c.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => run(config),
        Command::Agent {
            server,
            local,
            name,
            token,
            token_file,
        } => {
            let token = match token_file {
                Some(f) => match std::fs::read_to_string(&f) {
                    Ok(t) => Some(t.trim_end_matches(['\r', '\n']).to_owned()),
                    Err(e) => {
                        error!("{}: {e}", f.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => token,
            };
            let mut config = Config::default();
            config
                .tunnel_agent
                .push(TunnelAgentConfig::new(server, local, name, token));
            if let Err(e) = config.validate() {
                error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            info!("switchboard {} agent starting", env!("CARGO_PKG_VERSION"));
            serve(config, None)
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let config = match &path {
        Some(p) => Config::load(p),
        None => Config::builtin(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match &path {
        Some(p) => info!(
            "switchboard {} starting with {}",
            env!("CARGO_PKG_VERSION"),
            p.display()
        ),
        None => info!(
            "switchboard {} starting with the built-in loopback config",
            env!("CARGO_PKG_VERSION")
        ),
    }
    serve(config, path)
}

/// Start every role of `config` and run until stopped; SIGHUP reloads `path`.
fn serve(config: Config, path: Option<PathBuf>) -> ExitCode {
    for w in config.warnings() {
        warn!("{w}");
    }
    let mut engine = match Engine::from_config(&config) {
        Ok(e) => e,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // The roles hold what they need; a large config (tens of thousands of
    // connpts) should not stay in memory for the whole run.
    drop(config);
    if let Some(p) = path {
        engine.watch_config(p);
    }
    if let Err(e) = engine.handle_signals().and_then(|()| engine.start()) {
        error!("{e}");
        return ExitCode::from(match e {
            EngineError::Listen(_) | EngineError::Role { .. } => EXIT_CONFIG,
            EngineError::Io(_) => EXIT_RUNTIME,
        });
    }
    match engine.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// simplelog (the user's design card) writing through a
/// [`switchboard::engine::LogSink`]: one write call per line, from a writer
/// thread, so a stalled stderr (a pipe nobody drains) never stalls the event
/// loop; lines it cannot take are dropped and counted
/// (`switchboard_log_dropped_total`). Under systemd (`JOURNAL_STREAM` set)
/// lines carry no timestamp of their own: journald adds one.
fn init_logging(level: LevelFilter) {
    let mut config = simplelog::ConfigBuilder::new();
    config
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        config.set_time_level(LevelFilter::Off);
    }
    let config = config.build();
    // Only fails if a logger is already set, which cannot happen here.
    match switchboard::engine::LogSink::new(std::io::stderr()) {
        Ok(sink) => {
            simplelog::WriteLogger::init(level, config, sink).ok();
        }
        Err(e) => eprintln!("error: cannot start the log writer thread ({e}): logging is off"),
    }
}
