//! Multiblaster: the Croquet tutorial game, replicated with bevy_synq.
//!
//! ```text
//! cargo run --release --example multiblaster --features render                 # the lobby: host, join by link, or a reflector
//! cargo run --release --example multiblaster --features render -- --host       # skip the lobby and host at once
//! cargo run --release --example multiblaster --features render -- --join LINK  # join that game from another process
//! cargo run --release --example multiblaster --features render -- --reflector 127.0.0.1:5800  # a standalone synq-reflector
//! cargo run --example multiblaster -- --headless --bots 4 --seconds 60         # CI's determinism soak test
//! ```
//!
//! Controls: arrows or WASD to turn and thrust, space (or S / down) to fire, Enter to type your
//! initials for the high-score table, Q to show or hide the join link's QR code, Esc to leave the
//! game for the lobby.
//!
//! With no `--join` / `--reflector` / `--host`, the window opens on the lobby ([`lobby`]): host a
//! game, join one by its `synq://` link, or play a named session on a standalone reflector. Only
//! when the player picks one does the game start networking, so the lobby needs no free port and
//! reveals nothing. Hosting runs a UDP reflector on a background thread ([`net`]) for as long as
//! this process plays in that session, and prints the join link
//! (`synq://<host>:<port>/<appId>/<name>#pw=<password>`) and its QR code; the game shows both.
//! Esc leaves the session and returns to the lobby, from which any other session can be joined
//! without restarting: the app has one `SynqPlugin` for its whole life and switches sessions with
//! `SynqSession` ([`view`]).
//!
//! `--headless` runs N bot players, each a separate Bevy app, on one in-process reflector with a
//! virtual clock (faster than real time), adds a late joiner halfway through, and prints each
//! client's model time and state hash at the end; it exits non-zero if they differ.
//!
//! Screenshots for CI: `--screenshot PATH` alone hosts at once (as `--host`) and saves the game;
//! `--screenshot-lobby PATH` saves the lobby, and with `--screenshot` as well it then drives the
//! lobby with simulated key presses — host, Esc back to the lobby, host a new session — and saves
//! that second game, so one run covers the lobby, leaving and joining again.

mod bots;
#[cfg(feature = "render")]
mod game;
#[cfg(feature = "render")]
mod hud;
#[cfg(feature = "render")]
mod lobby;
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
  (no option)           open a window on the lobby: host a game, join one by its link, or play
                        a named session on a standalone reflector (the options below fill it in)
  --host                skip the lobby and host at once: an embedded reflector, its join link
                        printed (with a QR code) and shown in the game
  --join LINK           skip the lobby and join a running game: LINK is the synq://… link it shows
  --reflector ADDR      skip the lobby and use a standalone synq-reflector at ADDR (host:port)
  --name NAME           session name for hosting or a reflector (default: random; alias --session)
  --password PW         session password (default: random)
  --initials ABC        your initials for the high-score table (or press Enter in the game)
  --bots N              number of bot players (headless default 4, windowed default 0)
  --headless            run bot players without a window and print their state hashes
  --seconds S           headless: seconds of session time to simulate (default 60)
  --leaver              headless: one extra bot joins at the start and quits at 3/4 of the run
  --screenshot PATH     windowed: save a PNG of the game after --frames frames and exit; alone,
                        it hosts at once (as --host)
  --screenshot-lobby PATH
                        windowed: save a PNG of the lobby after --frames frames; with
                        --screenshot too, then host from the lobby, leave with Esc, host again
                        and save that game (simulated key presses)
  --frames N            frames before each screenshot (default 60)";

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
    host: bool,
    screenshot: Option<std::path::PathBuf>,
    screenshot_lobby: Option<std::path::PathBuf>,
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
            "--host" => args.host = true,
            "--screenshot" => args.screenshot = Some(value("--screenshot")?.into()),
            "--screenshot-lobby" => args.screenshot_lobby = Some(value("--screenshot-lobby")?.into()),
            "--frames" => args.frames = value("--frames")?.parse().map_err(|e| format!("--frames: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let direct = [args.join.is_some(), args.reflector.is_some(), args.host].into_iter().filter(|d| *d).count();
    if direct > 1 {
        return Err("--join, --reflector and --host exclude each other".into());
    }
    if args.headless && direct > 0 {
        return Err("--headless runs its own in-process reflector; it takes no --join, --reflector or --host".into());
    }
    if args.screenshot_lobby.is_some() && direct > 0 {
        return Err("--screenshot-lobby starts at the lobby; it takes no --join, --reflector or --host".into());
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
    // A screenshot of the game with no lobby screenshot asked for: host at once, as CI always did.
    let direct = args.join.is_some()
        || args.reflector.is_some()
        || args.host
        || (args.screenshot.is_some() && args.screenshot_lobby.is_none());
    let network = if direct {
        // Opened before the window, so a bad link or address ends the program with a message
        // instead of a window that shows an error.
        match net::Network::open(
            args.join.as_deref(),
            args.reflector.as_deref(),
            args.name.as_deref(),
            args.password.as_deref(),
        ) {
            Ok(network) => Some(network),
            Err(message) => {
                eprintln!("multiblaster: {message}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let options = view::ViewOptions {
        bots: args.bots.unwrap_or(0),
        screenshot: args.screenshot,
        screenshot_lobby: args.screenshot_lobby,
        frames: args.frames,
        initials: args.initials,
        name: args.name,
        password: args.password,
        reflector: args.reflector,
    };
    view::run(network, options)
}

#[cfg(not(feature = "render"))]
fn windowed(args: Args) -> ExitCode {
    let _ = args;
    eprintln!("multiblaster: this build has no window; rebuild with `--features render`, or run with --headless");
    ExitCode::from(2)
}
