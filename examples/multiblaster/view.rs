//! The windowed view: vector line art with gizmos, smoothed motion, a HUD, keyboard input.
//!
//! The HUD shows the session name, the join link, the connection state, the player count, the
//! scores in play and the high-score table. Enter starts typing initials (1–3 letters or digits,
//! Enter again to confirm, Escape to cancel); they are published as [`SetInitials`] and re-sent
//! until the own ship carries them (e.g. after a reconnect).
//!
//! Reads the model with [`Model`] / [`ModelQuery`] and publishes [`Control`] events; never writes
//! to the model. Model coordinates are canvas coordinates (1000×1000, y down); the camera shows
//! the world centred, y up, so `to_screen` flips y.

use bevy::camera::ScalingMode;
use bevy::color::palettes::css::{GOLD, GRAY, ORANGE, SKY_BLUE};
use bevy::platform::collections::HashMap;
use bevy::prelude::*;
use bevy::render::view::screenshot::{Screenshot, ScreenshotCaptured, save_to_disk};
use bevy::sprite::Anchor;
use bevy_synq::prelude::*;
use bevy_synq::{SessionConfig, SynqClient};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::model::{Asteroid, Blast, Control, HighScores, SAFE_ZONE, SetInitials, Ship, WORLD, clean_initials};
use crate::net::Network;

/// The windowed game's options from the command line.
pub struct ViewOptions {
    /// Bot players to add (on a thread of their own, through the same reflector).
    pub bots: usize,
    /// Save a PNG here after `frames` frames and exit.
    pub screenshot: Option<PathBuf>,
    /// Frames before the screenshot.
    pub frames: u32,
    /// Initials to sign the own ship with from the start.
    pub initials: Option<String>,
}

/// Opens the window: this player and `options.bots` bot players, all on `network`'s reflector.
pub fn run(session: SessionConfig, network: &Network, options: ViewOptions) -> ExitCode {
    let bots = crate::bots::spawn_bot_thread(options.bots, session.clone(), network.target.clone());

    let mut app = App::new();
    app.add_plugins(DefaultPlugins.set(WindowPlugin {
        primary_window: Some(Window {
            title: format!("Multiblaster — {}", session.name),
            resolution: (720, 720).into(),
            ..default()
        }),
        ..default()
    }))
    .add_plugins(SynqPlugin::new(crate::model::model, session.clone()).with_reflector(network.target.clone()))
    .insert_resource(ClearColor(Color::BLACK))
    .insert_resource(SessionInfo { name: session.name.clone(), link: network.link.clone() })
    .insert_resource(Initials { wanted: options.initials, ..default() })
    .init_resource::<Smoothed>()
    .add_systems(Startup, setup)
    .add_systems(Update, (keyboard, send_initials, smooth, (draw, hud, labels)).chain());
    if let Some(path) = options.screenshot {
        app.insert_resource(ScreenshotPlan { path, frames: options.frames, taken: false })
            .add_systems(Update, screenshot_after_frames);
    }
    app.run();
    // Stop the bots before the reflector goes (main stops it after this returns).
    drop(bots);
    ExitCode::SUCCESS
}

#[derive(Resource)]
struct SessionInfo {
    name: String,
    link: String,
}

/// The player's initials: what they want, what they are typing.
#[derive(Resource, Default)]
struct Initials {
    /// The initials the own ship should carry.
    wanted: Option<String>,
    /// `Some` while typing (Enter … Enter).
    editing: Option<String>,
    /// When `wanted` was last published (seconds of app time).
    sent_at: Option<f64>,
}

#[derive(Resource)]
struct ScreenshotPlan {
    path: PathBuf,
    frames: u32,
    taken: bool,
}

/// The parts of the HUD.
#[derive(Component, Clone, Copy, PartialEq, Eq)]
enum Hud {
    /// Top left: session, players, connection state, scores in play.
    Main,
    /// Top right: the high-score table.
    HighScores,
    /// Bottom: initials, join link.
    Link,
}

/// A ship's score label, following its ship.
#[derive(Component)]
struct Label(ModelId);

/// The smoothed position and angle of each model object, by stable id (the tutorial's WeakMap).
#[derive(Resource, Default)]
struct Smoothed(HashMap<ModelId, Vec3>);

fn setup(mut commands: Commands) {
    commands.spawn((
        Camera2d,
        Projection::Orthographic(OrthographicProjection {
            scaling_mode: ScalingMode::AutoMin { min_width: WORLD, min_height: WORLD },
            ..OrthographicProjection::default_2d()
        }),
    ));
    commands.spawn((
        Hud::Main,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(20.0), ..default() },
        TextColor(Color::WHITE),
        Anchor::TOP_LEFT,
        Transform::from_xyz(-WORLD / 2.0 + 12.0, WORLD / 2.0 - 12.0, 10.0),
    ));
    commands.spawn((
        Hud::HighScores,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(20.0), ..default() },
        TextColor(Color::from(GOLD)),
        TextLayout::justify(Justify::Right),
        Anchor::TOP_RIGHT,
        Transform::from_xyz(WORLD / 2.0 - 12.0, WORLD / 2.0 - 12.0, 10.0),
    ));
    commands.spawn((
        Hud::Link,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(14.0), ..default() },
        TextColor(Color::from(GRAY)),
        Anchor::BOTTOM_LEFT,
        Transform::from_xyz(-WORLD / 2.0 + 12.0, -WORLD / 2.0 + 10.0, 10.0),
    ));
}

/// Model (canvas) coordinates to world coordinates.
fn to_screen(x: f32, y: f32) -> Vec2 {
    Vec2::new(x - WORLD / 2.0, WORLD / 2.0 - y)
}

/// Keys that hold one control, and that control.
type KeyGroup = (&'static [KeyCode], fn(bool) -> Control);

/// The character a key types into the initials, if any.
fn initial_char(key: KeyCode) -> Option<char> {
    const LETTERS: [KeyCode; 26] = [
        KeyCode::KeyA,
        KeyCode::KeyB,
        KeyCode::KeyC,
        KeyCode::KeyD,
        KeyCode::KeyE,
        KeyCode::KeyF,
        KeyCode::KeyG,
        KeyCode::KeyH,
        KeyCode::KeyI,
        KeyCode::KeyJ,
        KeyCode::KeyK,
        KeyCode::KeyL,
        KeyCode::KeyM,
        KeyCode::KeyN,
        KeyCode::KeyO,
        KeyCode::KeyP,
        KeyCode::KeyQ,
        KeyCode::KeyR,
        KeyCode::KeyS,
        KeyCode::KeyT,
        KeyCode::KeyU,
        KeyCode::KeyV,
        KeyCode::KeyW,
        KeyCode::KeyX,
        KeyCode::KeyY,
        KeyCode::KeyZ,
    ];
    const DIGITS: [KeyCode; 10] = [
        KeyCode::Digit0,
        KeyCode::Digit1,
        KeyCode::Digit2,
        KeyCode::Digit3,
        KeyCode::Digit4,
        KeyCode::Digit5,
        KeyCode::Digit6,
        KeyCode::Digit7,
        KeyCode::Digit8,
        KeyCode::Digit9,
    ];
    if let Some(i) = LETTERS.iter().position(|k| *k == key) {
        return Some((b'A' + i as u8) as char);
    }
    DIGITS.iter().position(|k| *k == key).map(|i| (b'0' + i as u8) as char)
}

/// Keys → thruster booleans on press and release, fire on press (auto-repeat never shows up as
/// a new press). Enter switches to typing initials; the game keys rest meanwhile.
fn keyboard(
    keys: Res<ButtonInput<KeyCode>>,
    mut initials: ResMut<Initials>,
    mut publish: Publish<Control>,
    mut held: Local<[bool; 3]>,
) {
    if let Some(mut typed) = initials.editing.clone() {
        for key in keys.get_just_pressed() {
            match key {
                KeyCode::Enter | KeyCode::NumpadEnter => {
                    let clean = clean_initials(&typed);
                    if !clean.is_empty() {
                        initials.wanted = Some(clean);
                        initials.sent_at = None;
                    }
                    initials.editing = None;
                    return;
                }
                KeyCode::Escape => {
                    initials.editing = None;
                    return;
                }
                KeyCode::Backspace => {
                    typed.pop();
                }
                other => {
                    if let Some(c) = initial_char(*other)
                        && typed.len() < 3
                    {
                        typed.push(c);
                    }
                }
            }
        }
        initials.editing = Some(typed);
        return;
    }
    if keys.any_just_pressed([KeyCode::Enter, KeyCode::NumpadEnter]) {
        initials.editing = Some(String::new());
        // Let go of the thrusters while typing.
        let releases = [Control::Left(false), Control::Right(false), Control::Forward(false)];
        for (held, release) in held.iter_mut().zip(releases) {
            if std::mem::take(held) {
                publish.send(release);
            }
        }
        return;
    }
    let groups: [KeyGroup; 3] = [
        (&[KeyCode::ArrowLeft, KeyCode::KeyA], Control::Left),
        (&[KeyCode::ArrowRight, KeyCode::KeyD], Control::Right),
        (&[KeyCode::ArrowUp, KeyCode::KeyW], Control::Forward),
    ];
    for ((group, control), held) in groups.into_iter().zip(held.iter_mut()) {
        let pressed = keys.any_pressed(group.iter().copied());
        if pressed != *held {
            *held = pressed;
            publish.send(control(pressed));
        }
    }
    if keys.any_just_pressed([KeyCode::Space, KeyCode::KeyS, KeyCode::ArrowDown]) {
        publish.send(Control::Fire);
    }
}

/// Publishes the wanted initials until the own ship carries them (at most once a second).
fn send_initials(
    time: Res<Time>,
    client: Res<SynqClient>,
    mut initials: ResMut<Initials>,
    mut ships: ModelQuery<&Ship>,
    mut publish: Publish<SetInitials>,
) {
    let Some(wanted) = initials.wanted.clone() else { return };
    if !client.is_synced() {
        return;
    }
    let me = client.ids().view;
    let Some(current) = ships.iter().find(|s| s.view == me).map(|s| s.initials.clone()) else { return };
    let now = time.elapsed_secs_f64();
    if current != wanted && initials.sent_at.is_none_or(|t| now >= t + 1.0) {
        initials.sent_at = Some(now);
        publish.send(SetInitials(wanted));
    }
}

/// 30 % of the way to the model each frame; snap on wrap-around or respawn (≥ 50 px) and on big
/// turns (≥ 1 rad).
fn smooth(
    mut smoothed: ResMut<Smoothed>,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
    mut asteroids: ModelQuery<(&ModelId, &Asteroid)>,
    mut blasts: ModelQuery<(&ModelId, &Blast)>,
) {
    let mut targets: Vec<(ModelId, Vec3)> = Vec::new();
    targets.extend(ships.iter().map(|(id, s)| (*id, Vec3::new(s.x, s.y, s.a))));
    targets.extend(asteroids.iter().map(|(id, a)| (*id, Vec3::new(a.x, a.y, a.a))));
    targets.extend(blasts.iter().map(|(id, b)| (*id, Vec3::new(b.x, b.y, 0.0))));
    let mut next = HashMap::default();
    for (id, target) in targets {
        let value = match smoothed.0.get(&id) {
            Some(old) => {
                let d = target - *old;
                if d.x.abs() >= 50.0 || d.y.abs() >= 50.0 || d.z.abs() >= 1.0 { target } else { *old + d * 0.3 }
            }
            None => target,
        };
        next.insert(id, value);
    }
    smoothed.0 = next;
}

/// Draws `points` (model-local, relative to (x, y), rotated by `a`) as a closed or open polyline,
/// and again across the edges when the object is near them.
fn draw_shape(gizmos: &mut Gizmos, at: Vec3, radius: f32, points: &[Vec2], closed: bool, color: Color) {
    let (sin, cos) = at.z.sin_cos();
    let mut xs = vec![0.0];
    if at.x < radius {
        xs.push(WORLD);
    }
    if at.x > WORLD - radius {
        xs.push(-WORLD);
    }
    let mut ys = vec![0.0];
    if at.y < radius {
        ys.push(WORLD);
    }
    if at.y > WORLD - radius {
        ys.push(-WORLD);
    }
    for ox in &xs {
        for oy in &ys {
            let mut line: Vec<Vec2> = points
                .iter()
                .map(|p| to_screen(at.x + ox + p.x * cos - p.y * sin, at.y + oy + p.x * sin + p.y * cos))
                .collect();
            if closed && let Some(first) = line.first().copied() {
                line.push(first);
            }
            gizmos.linestrip_2d(line, color);
        }
    }
}

fn draw(
    mut gizmos: Gizmos,
    smoothed: Res<Smoothed>,
    client: Res<SynqClient>,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
    mut asteroids: ModelQuery<(&ModelId, &Asteroid)>,
    mut blasts: ModelQuery<(&ModelId, &Blast)>,
) {
    let me = client.ids().view;
    // The world's edge and the safe zone.
    gizmos.rect_2d(Isometry2d::IDENTITY, Vec2::splat(WORLD), Color::from(GRAY).with_alpha(0.4));
    let safe =
        [Vec2::new(SAFE_ZONE, 0.0), Vec2::new(0.0, SAFE_ZONE), Vec2::new(-SAFE_ZONE, 0.0), Vec2::new(0.0, -SAFE_ZONE)];
    draw_shape(&mut gizmos, Vec3::new(500.0, 500.0, 0.0), 0.0, &safe, true, Color::from(GRAY).with_alpha(0.25));

    for (id, asteroid) in asteroids.iter() {
        let Some(at) = smoothed.0.get(id).copied() else { continue };
        let s = asteroid.size;
        let color = Color::WHITE;
        if asteroid.was_hit == 0 {
            let diamond = [Vec2::new(s, 0.0), Vec2::new(0.0, s), Vec2::new(-s, 0.0), Vec2::new(0.0, -s)];
            draw_shape(&mut gizmos, at, s, &diamond, true, color);
        } else {
            // Debris: the four edges drift apart by `was_hit`.
            let t = asteroid.was_hit as f32;
            let fade = color.with_alpha(1.0 - (t / s).min(0.9));
            for (a, b, dir) in [
                (Vec2::new(s, 0.0), Vec2::new(0.0, s), Vec2::new(t, t)),
                (Vec2::new(0.0, s), Vec2::new(-s, 0.0), Vec2::new(-t, t)),
                (Vec2::new(-s, 0.0), Vec2::new(0.0, -s), Vec2::new(-t, -t)),
                (Vec2::new(0.0, -s), Vec2::new(s, 0.0), Vec2::new(t, -t)),
            ] {
                draw_shape(&mut gizmos, at, s + 2.0 * t, &[a + dir, b + dir], false, fade);
            }
        }
    }

    for (id, ship) in ships.iter() {
        let Some(at) = smoothed.0.get(id).copied() else { continue };
        let own = ship.view == me;
        let color = if own { Color::from(GOLD) } else { Color::WHITE };
        let (nose, left, right) = (Vec2::new(20.0, 0.0), Vec2::new(-20.0, 10.0), Vec2::new(-20.0, -10.0));
        if ship.was_hit == 0 {
            draw_shape(&mut gizmos, at, 30.0, &[nose, left, right], true, color);
            if own {
                // The tutorial fills the own ship; gizmos draw lines, so nest a smaller one.
                draw_shape(&mut gizmos, at, 30.0, &[nose * 0.5, left * 0.5, right * 0.5], true, color);
            }
            if ship.forward {
                draw_shape(
                    &mut gizmos,
                    at,
                    40.0,
                    &[Vec2::new(-22.0, 5.0), Vec2::new(-32.0, 0.0), Vec2::new(-22.0, -5.0)],
                    false,
                    Color::from(ORANGE),
                );
            }
            if ship.is_safe() {
                gizmos.circle_2d(to_screen(at.x, at.y), 26.0, Color::from(SKY_BLUE).with_alpha(0.5));
            }
        } else {
            let t = ship.was_hit as f32;
            let fade = color.with_alpha(1.0 - (t / 60.0).min(0.9));
            for (a, b, dir) in
                [(nose, left, Vec2::new(t, t)), (left, right, Vec2::new(-t, 0.0)), (right, nose, Vec2::new(t, -t))]
            {
                draw_shape(&mut gizmos, at, 30.0 + 2.0 * t, &[a + dir, b + dir], false, fade);
            }
        }
    }

    for (id, _) in blasts.iter() {
        let Some(at) = smoothed.0.get(id).copied() else { continue };
        gizmos.circle_2d(to_screen(at.x, at.y), 2.0, Color::WHITE);
    }
}

fn status_text(status: &SynqStatus) -> String {
    match status {
        SynqStatus::Connecting => "connecting".into(),
        SynqStatus::Syncing { progress } => format!("syncing {:.0} %", progress * 100.0),
        SynqStatus::Synced => "synced".into(),
        SynqStatus::Disconnected { reason } => format!("disconnected: {reason}"),
    }
}

fn short(view: ViewId) -> String {
    let text = view.to_string();
    text[text.len().saturating_sub(4)..].to_string()
}

#[allow(clippy::too_many_arguments)]
fn hud(
    mut texts: Query<(&mut Text2d, &Hud)>,
    info: Res<SessionInfo>,
    initials: Res<Initials>,
    status: Res<SynqStatus>,
    client: Res<SynqClient>,
    model: Model,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
) {
    let me = client.ids().view;
    let players = model.views().map_or(0, |v| v.len());
    let mut scores: Vec<(u32, ModelId, ViewId, String)> =
        ships.iter().map(|(id, s)| (s.score, *id, s.view, s.initials.clone())).collect();
    scores.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = format!(
        "MULTIBLASTER  session \"{}\"\n{} player{}  |  {}\n",
        info.name,
        players,
        if players == 1 { "" } else { "s" },
        status_text(&status)
    );
    for (score, _, view, initials) in scores.iter().take(8) {
        let name = if initials.is_empty() { format!("player {}", short(*view)) } else { initials.clone() };
        let who = if *view == me { format!("{name} (you)") } else { name };
        out.push_str(&format!("{score:>4}  {who}\n"));
    }

    let mut high = String::from("HIGH SCORES\n");
    if let Some(table) = model.resource::<HighScores>() {
        for (initials, score) in table.ranked().into_iter().take(10) {
            high.push_str(&format!("{initials:<3} {score:>5}\n"));
        }
    }

    let bottom = match &initials.editing {
        Some(typed) => format!("INITIALS: {typed}_   (1-3 letters or digits, Enter = OK, Esc = cancel)\n{}", info.link),
        None => format!(
            "{}   Enter: set initials\njoin: {}",
            initials.wanted.as_deref().map_or_else(|| "no initials".to_string(), |w| format!("initials {w}")),
            info.link
        ),
    };
    for (mut text, part) in &mut texts {
        let wanted = match part {
            Hud::Main => &out,
            Hud::HighScores => &high,
            Hud::Link => &bottom,
        };
        if text.0 != *wanted {
            text.0 = wanted.clone();
        }
    }
}

/// A score label next to each ship, as in the tutorial.
fn labels(
    mut commands: Commands,
    smoothed: Res<Smoothed>,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
    mut existing: Query<(Entity, &Label, &mut Text2d, &mut Transform)>,
) {
    let current: HashMap<ModelId, String> = ships
        .iter()
        .map(|(id, s)| {
            (*id, if s.initials.is_empty() { s.score.to_string() } else { format!("{} {}", s.initials, s.score) })
        })
        .collect();
    let mut seen = Vec::new();
    for (entity, label, mut text, mut transform) in &mut existing {
        match (current.get(&label.0), smoothed.0.get(&label.0)) {
            (Some(wanted), Some(at)) => {
                if text.0 != *wanted {
                    text.0 = wanted.clone();
                }
                transform.translation = (to_screen(at.x, at.y) + Vec2::new(26.0, 18.0)).extend(5.0);
                seen.push(label.0);
            }
            _ => commands.entity(entity).despawn(),
        }
    }
    for (id, label) in current {
        if !seen.contains(&id) {
            commands.spawn((
                Label(id),
                Text2d::new(label),
                TextFont { font_size: FontSize::Px(16.0), ..default() },
                TextColor(Color::WHITE),
                Transform::from_xyz(-10_000.0, 0.0, 5.0),
            ));
        }
    }
}

fn screenshot_after_frames(mut commands: Commands, mut plan: ResMut<ScreenshotPlan>, mut frame: Local<u32>) {
    *frame += 1;
    if plan.taken || *frame < plan.frames {
        return;
    }
    plan.taken = true;
    commands.spawn(Screenshot::primary_window()).observe(save_to_disk(plan.path.clone())).observe(
        |_: On<ScreenshotCaptured>, mut exit: MessageWriter<AppExit>| {
            exit.write(AppExit::Success);
        },
    );
}
