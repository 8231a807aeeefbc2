//! Multiblaster: the Croquet tutorial game, replicated with bevy_synq.
//!
//! ```text
//! cargo run --release --example multiblaster --features render                 # host: embedded reflector, prints a join link
//! cargo run --release --example multiblaster --features render -- --join LINK  # join that game from another process
//! cargo run --release --example multiblaster --features render -- --reflector 127.0.0.1:5800  # a standalone synq-reflector
//! cargo run --example multiblaster -- --headless --bots 4 --seconds 60         # CI's determinism soak test
//! ```
//!
//! Controls: arrows or WASD to turn and thrust, space (or S / down) to fire, Enter to type your
//! initials for the high-score table.
//!
//! With no `--join` / `--reflector`, the game runs a UDP reflector ([`net::EmbeddedUdpReflector`])
//! on a background thread, bound to 127.0.0.1 on a free port, and prints the join link
//! (`synq://127.0.0.1:<port>/<appId>/<name>#pw=<password>`) and its QR code.
//!
//! `--headless` runs N bot players, each a separate Bevy app, on one in-process reflector with a
//! virtual clock (faster than real time), adds a late joiner halfway through, and prints each
//! client's model time and state hash at the end; it exits non-zero if they differ.

mod bots;
mod model;
#[cfg(feature = "render")]
mod net;
#[cfg(feature = "render")]
mod qr;
#[cfg(feature = "render")]
mod view;

use bevy_synq::SessionConfig;
use std::process::ExitCode;

/// The app id of every Multiblaster session.
pub const APP_ID: &str = "io.bevy-synq.multiblaster";

const USAGE: &str = "\
usage: multiblaster [options]
  (no option)           open a window and host the game: an embedded reflector on 127.0.0.1,
                        its join link printed (with a QR code) and shown in the HUD
  --join LINK           join a running game: LINK is the synq://… link it printed
  --reflector ADDR      use a standalone synq-reflector at ADDR (host:port)
  --name NAME           session name (default: random; --session is an alias)
  --password PW         session password (default: random)
  --initials ABC        your initials for the high-score table (or press Enter in the game)
  --bots N              number of bot players (headless default 4, windowed default 0)
  --headless            run bot players without a window and print their state hashes
  --seconds S           headless: seconds of session time to simulate (default 60)
  --leaver              headless: one extra bot joins at the start and quits at 3/4 of the run
  --screenshot PATH     windowed: save a PNG after --frames frames and exit
  --frames N            frames before the screenshot (default 60)";

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    headless: bool,
    leaver: bool,
    bots: Option<usize>,
    seconds: u64,
    name: Option<String>,
    password: Option<String>,
    initials: Option<String>,
    join: Option<String>,
    reflector: Option<String>,
    screenshot: Option<std::path::PathBuf>,
    frames: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { seconds: 60, frames: 60, ..Args::default() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--headless" => args.headless = true,
            "--leaver" => args.leaver = true,
            "--bots" => args.bots = Some(value("--bots")?.parse().map_err(|e| format!("--bots: {e}"))?),
            "--seconds" => args.seconds = value("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--name" | "--session" => args.name = Some(value(&arg)?),
            "--password" => args.password = Some(value("--password")?),
            "--initials" => {
                let initials = model::clean_initials(&value("--initials")?);
                if initials.is_empty() {
                    return Err("--initials: give 1 to 3 letters or digits".into());
                }
                args.initials = Some(initials);
            }
            "--join" => args.join = Some(value("--join")?),
            "--reflector" => args.reflector = Some(value("--reflector")?),
            "--screenshot" => args.screenshot = Some(value("--screenshot")?.into()),
            "--frames" => args.frames = value("--frames")?.parse().map_err(|e| format!("--frames: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.join.is_some() && args.reflector.is_some() {
        return Err("--join and --reflector exclude each other".into());
    }
    if args.headless && (args.join.is_some() || args.reflector.is_some()) {
        return Err("--headless runs its own in-process reflector; it takes neither --join nor --reflector".into());
    }
    Ok(args)
}

/// The session every client of this game joins.
fn session_config(name: &str, password: &str) -> SessionConfig {
    SessionConfig::new(APP_ID, name, password).with_model_source("model.rs", include_str!("model.rs"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("multiblaster: {message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        }
    };
    if args.headless {
        // Fixed name and password: the soak test plays the same game every run.
        let session = session_config(
            args.name.as_deref().unwrap_or("multiblaster"),
            args.password.as_deref().unwrap_or("multiblaster"),
        );
        let bots = args.bots.unwrap_or(4);
        return if bots::run_headless(session, bots, args.seconds, args.leaver) {
            ExitCode::SUCCESS
        } else {
            eprintln!("multiblaster: the replicas' state hashes differ");
            ExitCode::FAILURE
        };
    }
    windowed(args)
}

#[cfg(feature = "render")]
fn windowed(args: Args) -> ExitCode {
    let network = match net::Network::open(
        args.join.as_deref(),
        args.reflector.as_deref(),
        args.name.as_deref(),
        args.password.as_deref(),
    ) {
        Ok(network) => network,
        Err(message) => {
            eprintln!("multiblaster: {message}");
            return ExitCode::from(2);
        }
    };
    network.print_welcome();
    let session = session_config(&network.name, &network.password);
    let options = view::ViewOptions {
        bots: args.bots.unwrap_or(0),
        screenshot: args.screenshot,
        frames: args.frames,
        initials: args.initials,
    };
    let code = view::run(session, &network, options);
    network.stop();
    code
}

#[cfg(not(feature = "render"))]
fn windowed(args: Args) -> ExitCode {
    let _ = args;
    eprintln!("multiblaster: this build has no window; rebuild with `--features render`, or run with --headless");
    ExitCode::from(2)
}
