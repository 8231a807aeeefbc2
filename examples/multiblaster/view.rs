//! The windowed game: the app, its two screens, and the session it plays in.
//!
//! The app has one [`SynqPlugin`] for its whole life. Started from the lobby it is
//! [`SynqPlugin::idle`] and joins with [`SynqSession::join`] when the player picks a game;
//! started with `--join` / `--reflector` / `--host` it is [`SynqPlugin::new`], which joins at
//! startup. Either way Esc leaves the session ([`SynqSession::leave`]) and returns to the lobby,
//! and the next join starts clean: the model world is dropped on leave, and the views clear what
//! they kept per session.
//!
//! What a session needs besides the plugin lives in [`Current`]: the [`Network`] (with the
//! embedded reflector when this process hosts) and the bot players' thread. Both end when the
//! game screen is left, whether the player pressed Esc or the session ended under it (a refused
//! password, a host that went away: the lobby then says why), and when the window closes.
//!
//! The screens are the game's own [`Screen`] state, not the connection state: the lobby is shown
//! because the player is choosing, not because the client happens to be disconnected, and the
//! game screen shows a session that is still connecting or syncing (the HUD says so).
//!
//! [`lobby`](crate::lobby) is the start screen, [`game`](crate::game) draws the model and reads
//! the controls, [`hud`](crate::hud) shows the texts and the QR code.

use bevy::camera::ScalingMode;
use bevy::input::ButtonState;
use bevy::input::InputSystems;
use bevy::input::keyboard::{Key, KeyboardInput};
use bevy::prelude::*;
use bevy::render::view::screenshot::{Screenshot, ScreenshotCaptured, save_to_disk};
use bevy::window::PrimaryWindow;
use bevy_synq::prelude::*;
use bevy_synq::{SynqConnection, SynqSession, SynqState};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bots::{BotThread, spawn_bot_thread};
use crate::model::WORLD;
use crate::net::Network;

/// The windowed game's options from the command line.
pub struct ViewOptions {
    /// Bot players to add to each session (on a thread of their own, through the same reflector).
    pub bots: usize,
    /// Save a PNG of the game here after `frames` frames and exit.
    pub screenshot: Option<PathBuf>,
    /// Save a PNG of the lobby here after `frames` frames (see [`Script`]).
    pub screenshot_lobby: Option<PathBuf>,
    /// Frames before each screenshot.
    pub frames: u32,
    /// Initials to sign the own ship with from the start.
    pub initials: Option<String>,
    /// The lobby's session name, password and reflector address, from the command line.
    pub name: Option<String>,
    /// See `name`.
    pub password: Option<String>,
    /// See `name`.
    pub reflector: Option<String>,
}

/// Which screen the window shows.
#[derive(States, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Screen {
    /// Choosing a game.
    #[default]
    Lobby,
    /// Playing in the [`Current`] session.
    Game,
}

/// The session this window plays in, besides what the plugin holds: the network (and the
/// embedded reflector when hosting) and the bot players.
#[derive(Resource, Default)]
pub struct Current {
    /// Where the session is, its name and join link; `None` in the lobby.
    pub network: Option<Network>,
    /// The bot players' apps; dropping them stops their thread.
    bots: Option<BotThread>,
    /// The session was left; its bots and reflector stop once the plugin has let go of it.
    left: bool,
    /// The session was synced at least once (so a failure is an ending, not a failed join).
    synced: bool,
    /// The threads that end past sessions (see [`Current::end`]); `run` waits for them.
    ending: Endings,
}

/// Threads that end sessions, shared with [`run`] so it can wait for them before the process ends.
type Endings = std::sync::Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>;

impl Current {
    /// Takes over `network` and starts `bots` bot players in its session.
    fn begin(&mut self, network: Network, bots: usize) {
        self.end();
        self.left = false;
        self.synced = false;
        network.print_welcome();
        let session = crate::session_config(&network.name, &network.password);
        self.bots = spawn_bot_thread(bots, session, network.target.clone());
        self.network = Some(network);
    }

    /// Stops the bots, then the embedded reflector (if this process hosts one): in this order so
    /// the bots do not spend their last frames reconnecting to a reflector that is gone.
    ///
    /// On a thread of its own, because both wait for threads: the bots' apps run their schedules
    /// on Bevy's shared compute task pool, so a system of this app that waited for them there
    /// could hold the very pool thread they wait for; and the reflector gives its clients a grace
    /// period to hear that it closes, which no frame should wait for.
    fn end(&mut self) {
        let (bots, network) = (self.bots.take(), self.network.take());
        if bots.is_none() && network.is_none() {
            return;
        }
        let spawned = std::thread::Builder::new().name("multiblaster-end".into()).spawn(move || {
            drop(bots);
            if let Some(network) = network {
                network.stop();
            }
        });
        match (spawned, self.ending.lock()) {
            (Ok(thread), Ok(mut ending)) => ending.push(thread),
            (Ok(_), Err(_)) => {}
            (Err(e), _) => eprintln!("multiblaster: cannot stop the session's bots and reflector: {e}"),
        }
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        self.end();
    }
}

/// Joins the session `network` leads to and switches to the game screen: the lobby's "go".
pub fn join(
    network: Network,
    bots: usize,
    session: &mut SynqSession,
    current: &mut Current,
    screen: &mut NextState<Screen>,
) {
    let config = crate::session_config(&network.name, &network.password);
    session.join(config, network.target.clone());
    current.begin(network, bots);
    screen.set(Screen::Game);
}

/// Opens the window, on the lobby, or in the session of `network` when the command line chose one.
pub fn run(network: Option<Network>, options: ViewOptions) -> ExitCode {
    let mut app = App::new();
    app.add_plugins(DefaultPlugins.set(WindowPlugin {
        primary_window: Some(Window { title: "Multiblaster".into(), resolution: (720, 720).into(), ..default() }),
        ..default()
    }));
    let mut current = Current::default();
    let ending = current.ending.clone();
    match network {
        Some(network) => {
            let session = crate::session_config(&network.name, &network.password);
            app.add_plugins(SynqPlugin::new(crate::model::model, session).with_reflector(network.target.clone()))
                .insert_state(Screen::Game);
            current.begin(network, options.bots);
        }
        None => {
            app.add_plugins(SynqPlugin::idle(crate::model::model)).insert_state(Screen::Lobby);
        }
    }
    app.insert_resource(current)
        .insert_resource(ClearColor(Color::BLACK))
        .add_plugins(crate::lobby::LobbyPlugin {
            name: options.name.unwrap_or_default(),
            password: options.password.unwrap_or_default(),
            reflector: options.reflector.unwrap_or_default(),
            bots: options.bots,
        })
        .add_plugins(crate::game::GamePlugin { initials: options.initials })
        .add_plugins(crate::hud::HudPlugin)
        .add_systems(Startup, camera)
        .add_systems(Update, watch_session.run_if(in_state(Screen::Game)))
        .add_systems(OnExit(Screen::Game), leave_session)
        .add_systems(Update, end_left_session.run_if(in_state(Screen::Lobby)))
        .add_systems(Update, window_title)
        .add_systems(Last, end_on_exit);
    if let Some(script) = Script::new(options.screenshot, options.screenshot_lobby, options.frames) {
        app.insert_resource(script).add_systems(PreUpdate, run_script.before(InputSystems));
    }
    let exit = app.run();
    // `end_on_exit` ended the last session; wait until every session's bots and reflector stopped.
    let threads = ending.lock().map(|mut threads| std::mem::take(&mut *threads)).unwrap_or_default();
    for thread in threads {
        let _ = thread.join();
    }
    match exit {
        AppExit::Success => ExitCode::SUCCESS,
        AppExit::Error(code) => ExitCode::from(code.get()),
    }
}

/// One camera for everything: the world is 1000×1000 units and fits the window, whatever its size;
/// the lobby's and the HUD's UI nodes draw on it in window pixels.
fn camera(mut commands: Commands) {
    commands.spawn((
        Camera2d,
        Projection::Orthographic(OrthographicProjection {
            scaling_mode: ScalingMode::AutoMin { min_width: WORLD, min_height: WORLD },
            ..OrthographicProjection::default_2d()
        }),
    ));
}

/// Back to the lobby when the session ends under the game (refused, reflector gone): the lobby
/// says why. Outside a session the game has nothing to show, and waiting there would hide the
/// reason behind a stale HUD.
///
/// The session's state is current by `Update` of the frame after the join was asked for (the
/// join and the state change both happen before it), which is also the first frame of this
/// screen, so `Disconnected` here always means the session ended.
fn watch_session(
    state: Res<State<SynqState>>,
    connection: Res<SynqConnection>,
    mut current: ResMut<Current>,
    mut form: ResMut<crate::lobby::LobbyForm>,
    mut screen: ResMut<NextState<Screen>>,
) {
    match state.get() {
        SynqState::Disconnected => {
            let reason = connection.reason.clone().unwrap_or_else(|| "no reason given".into());
            let what = if current.synced { "The session ended" } else { "Could not join" };
            form.note = Some(format!("{what}: {reason}"));
            screen.set(Screen::Lobby);
        }
        SynqState::Synced if !current.synced => current.synced = true,
        _ => {}
    }
}

/// Leaving the game screen leaves its session: the plugin tells the reflector and drops the
/// model at the start of the next frame.
fn leave_session(mut session: SynqSession, mut current: ResMut<Current>) {
    session.leave();
    current.left = true;
}

/// Then the bots and (when this process hosted) the reflector stop: after the leave, so the own
/// view's exit reaches the reflector while it still runs, and the client does not see its
/// reflector vanish under it.
fn end_left_session(session: SynqSession, mut current: ResMut<Current>) {
    if current.left && session.ids().is_none() {
        current.left = false;
        current.end();
    }
}

/// When the app exits (window closed, screenshot taken) the bots and the reflector stop before
/// the process ends, rather than whenever the app happens to be dropped.
fn end_on_exit(mut exits: MessageReader<AppExit>, mut current: ResMut<Current>) {
    if exits.read().next().is_some() {
        current.end();
    }
}

/// The window's title names the session played in.
fn window_title(current: Res<Current>, mut windows: Query<&mut Window, With<PrimaryWindow>>) {
    if !current.is_changed() {
        return;
    }
    let title = match &current.network {
        Some(network) => format!("Multiblaster — {}", network.name),
        None => "Multiblaster".to_string(),
    };
    for mut window in &mut windows {
        if window.title != title {
            window.title = title.clone();
        }
    }
}

/// What the CI script does next, and on which screen (another screen means the previous step did
/// not do what it should: the script fails rather than save a misleading picture).
enum Step {
    /// Save a screenshot; exit afterwards if `exit`.
    Shot { path: PathBuf, exit: bool, on: Screen },
    /// Press and release a key, as the keyboard would.
    Press(KeyCode, Screen),
}

/// Screenshots for CI, and the key presses between them.
///
/// Keys are simulated as [`KeyboardInput`] messages written before Bevy's input systems, exactly
/// where the window's own key messages arrive, so the lobby and the game handle them through
/// their real input paths (the lobby reads the messages, the game reads [`ButtonInput`]).
#[derive(Resource)]
struct Script {
    /// The steps, each after so many frames since the previous one.
    steps: VecDeque<(u32, Step)>,
    /// Frames since the previous step.
    frames: u32,
    /// A pressed key to release in the next frame.
    release: Option<KeyCode>,
    /// A screenshot is being captured: wait for it before going on.
    capturing: bool,
}

impl Script {
    fn new(game: Option<PathBuf>, lobby: Option<PathBuf>, frames: u32) -> Option<Self> {
        let mut steps = VecDeque::new();
        match (lobby, game) {
            (Some(lobby), Some(game)) => {
                // Lobby, then "Host a game" (the lobby's first row, focused at start), Esc back to
                // the lobby once the game runs, host a new session, and save that game.
                steps.push_back((frames, Step::Shot { path: lobby, exit: false, on: Screen::Lobby }));
                steps.push_back((5, Step::Press(KeyCode::Enter, Screen::Lobby)));
                steps.push_back((frames / 2 + 1, Step::Press(KeyCode::Escape, Screen::Game)));
                steps.push_back((20, Step::Press(KeyCode::Enter, Screen::Lobby)));
                steps.push_back((frames, Step::Shot { path: game, exit: true, on: Screen::Game }));
            }
            (Some(path), None) => steps.push_back((frames, Step::Shot { path, exit: true, on: Screen::Lobby })),
            (None, Some(path)) => steps.push_back((frames, Step::Shot { path, exit: true, on: Screen::Game })),
            (None, None) => return None,
        }
        Some(Self { steps, frames: 0, release: None, capturing: false })
    }
}

fn key_message(key: KeyCode, state: ButtonState, window: Entity) -> KeyboardInput {
    let logical_key = match key {
        KeyCode::Enter => Key::Enter,
        KeyCode::Escape => Key::Escape,
        _ => Key::Unidentified(bevy::input::keyboard::NativeKey::Unidentified),
    };
    KeyboardInput { key_code: key, logical_key, state, text: None, repeat: false, window }
}

fn run_script(
    mut commands: Commands,
    mut script: ResMut<Script>,
    mut keys: MessageWriter<KeyboardInput>,
    window: Query<Entity, With<PrimaryWindow>>,
    screen: Res<State<Screen>>,
    mut exits: MessageWriter<AppExit>,
) {
    let Ok(window) = window.single() else { return };
    if let Some(key) = script.release.take() {
        keys.write(key_message(key, ButtonState::Released, window));
    }
    if script.capturing {
        return;
    }
    script.frames += 1;
    let Some((wait, _)) = script.steps.front() else { return };
    if script.frames < *wait {
        return;
    }
    script.frames = 0;
    let Some((_, step)) = script.steps.pop_front() else { return };
    let (Step::Press(_, on) | Step::Shot { on, .. }) = &step;
    if on != screen.get() {
        eprintln!("multiblaster script: expected the {on:?} screen, found the {:?} screen", screen.get());
        exits.write(AppExit::from_code(1));
        script.steps.clear();
        return;
    }
    match step {
        Step::Press(key, _) => {
            println!("multiblaster script: pressing {key:?} on the {:?} screen", screen.get());
            keys.write(key_message(key, ButtonState::Pressed, window));
            script.release = Some(key);
        }
        Step::Shot { path, exit, .. } => {
            println!("multiblaster script: saving the {:?} screen to {}", screen.get(), path.display());
            script.capturing = true;
            commands.spawn(Screenshot::primary_window()).observe(save_to_disk(path)).observe(
                move |_: On<ScreenshotCaptured>, mut script: ResMut<Script>, mut exits: MessageWriter<AppExit>| {
                    script.capturing = false;
                    if exit {
                        exits.write(AppExit::Success);
                    }
                },
            );
        }
    }
}
