//! The game screen: the model drawn as vector line art with gizmos, smoothed motion, score
//! labels, and the keyboard.
//!
//! Reads the model with [`Model`] / [`ModelQuery`] and publishes [`Control`] and [`SetInitials`]
//! events; never writes to the model. Model coordinates are canvas coordinates (1000×1000, y
//! down); the camera shows the world centred, y up, so [`to_screen`] flips y.
//!
//! Enter starts typing initials (1–3 letters or digits, Enter again to confirm, Esc to cancel);
//! they are published as [`SetInitials`] and re-sent until the own ship carries them (after a
//! reconnect, or in the next session joined from the lobby). Esc, when not typing, leaves the
//! session for the lobby.
//!
//! What the view keeps per session — the smoothed positions, keyed by the model's stable ids, and
//! the labels — is cleared when the game screen is left and whenever the client ends up outside a
//! session, so a new session never inherits positions or labels of ids that now mean other things.
//! Within a session the change feed ([`ModelChangesPlugin`]) says when a model entity appears or
//! goes away: labels are spawned and despawned, and smoothed positions dropped, from it.

use bevy::color::palettes::css::{GOLD, GRAY, ORANGE, SKY_BLUE};
use bevy::platform::collections::HashMap;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{SynqConnection, SynqState};

use crate::model::{Asteroid, Blast, Control, SAFE_ZONE, SetInitials, Ship, WORLD, clean_initials};
use crate::view::Screen;

/// The game screen's systems and per-session state.
pub struct GamePlugin {
    /// Initials to sign the own ship with from the start (`--initials`).
    pub initials: Option<String>,
}

impl Plugin for GamePlugin {
    fn build(&self, app: &mut App) {
        if !app.is_plugin_added::<ModelChangesPlugin>() {
            app.add_plugins(ModelChangesPlugin);
        }
        app.insert_resource(Initials { wanted: self.initials.clone(), ..default() })
            .init_resource::<Smoothed>()
            .add_systems(OnEnter(Screen::Game), start_game)
            .add_systems(OnExit(Screen::Game), forget_session)
            .add_systems(OnEnter(SynqState::Disconnected), forget_session)
            .add_systems(
                Update,
                (keyboard, send_initials.run_if(in_state(SynqState::Synced)), smooth, (draw, labels))
                    .chain()
                    .in_set(GameSystems)
                    .run_if(in_state(Screen::Game)),
            );
    }
}

/// The game screen's per-frame systems (the HUD runs after them).
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GameSystems;

/// The player's initials: what they want, what they are typing.
#[derive(Resource, Default)]
pub struct Initials {
    /// The initials the own ship should carry (kept across sessions; the lobby edits them too).
    pub wanted: Option<String>,
    /// `Some` while typing (Enter … Enter).
    pub editing: Option<String>,
    /// When `wanted` was last published (seconds of app time).
    sent_at: Option<f64>,
}

impl Initials {
    /// Sets the wanted initials, to be published anew.
    pub fn set(&mut self, wanted: Option<String>) {
        self.wanted = wanted;
        self.sent_at = None;
    }
}

/// A ship's score label, following its ship.
#[derive(Component)]
struct Label(ModelId);

/// The smoothed position and angle of each model object, by stable id (the tutorial's WeakMap).
#[derive(Resource, Default)]
pub struct Smoothed(HashMap<ModelId, Vec3>);

/// A new session: nothing typed, the initials to be published again.
fn start_game(mut initials: ResMut<Initials>) {
    initials.editing = None;
    initials.sent_at = None;
}

/// Forgets what belonged to the session: smoothed positions and labels.
fn forget_session(mut commands: Commands, mut smoothed: ResMut<Smoothed>, labels: Query<Entity, With<Label>>) {
    smoothed.0.clear();
    for label in &labels {
        commands.entity(label).despawn();
    }
}

/// The own view's id, while in a session.
pub fn own_view(connection: &SynqConnection) -> Option<ViewId> {
    connection.session.map(|ids| ids.view)
}

/// Model (canvas) coordinates to world coordinates.
pub fn to_screen(x: f32, y: f32) -> Vec2 {
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
/// a new press). Enter switches to typing initials; the game keys rest meanwhile. Esc leaves for
/// the lobby (or cancels typing).
fn keyboard(
    keys: Res<ButtonInput<KeyCode>>,
    mut initials: ResMut<Initials>,
    mut publish: Publish<Control>,
    mut held: Local<[bool; 3]>,
    mut screen: ResMut<NextState<Screen>>,
) {
    if let Some(mut typed) = initials.editing.clone() {
        for key in keys.get_just_pressed() {
            match key {
                KeyCode::Enter | KeyCode::NumpadEnter => {
                    let clean = clean_initials(&typed);
                    if !clean.is_empty() {
                        initials.set(Some(clean));
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
    let starts_typing = keys.any_just_pressed([KeyCode::Enter, KeyCode::NumpadEnter]);
    let leaves = keys.just_pressed(KeyCode::Escape);
    if starts_typing || leaves {
        // Let go of the thrusters while typing (a session left gets nothing more).
        let releases = [Control::Left(false), Control::Right(false), Control::Forward(false)];
        for (held, release) in held.iter_mut().zip(releases) {
            if std::mem::take(held) {
                publish.send(release);
            }
        }
        if leaves {
            screen.set(Screen::Lobby);
        } else {
            initials.editing = Some(String::new());
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

/// Publishes the wanted initials until the own ship carries them (at most once a second). Runs
/// while synced only: before, the own ship is not in the model yet.
fn send_initials(
    time: Res<Time>,
    connection: Res<SynqConnection>,
    mut initials: ResMut<Initials>,
    mut ships: ModelQuery<&Ship>,
    mut publish: Publish<SetInitials>,
) {
    let Some(wanted) = initials.wanted.clone() else { return };
    let Some(me) = own_view(&connection) else { return };
    let Some(current) = ships.iter().find(|s| s.view == me).map(|s| s.initials.clone()) else { return };
    let now = time.elapsed_secs_f64();
    if current != wanted && initials.sent_at.is_none_or(|t| now >= t + 1.0) {
        initials.sent_at = Some(now);
        publish.send(SetInitials(wanted));
    }
}

/// 30 % of the way to the model each frame; snap on wrap-around or respawn (≥ 50 px) and on big
/// turns (≥ 1 rad). What went away is forgotten.
fn smooth(
    mut smoothed: ResMut<Smoothed>,
    mut despawned: MessageReader<ModelEntityDespawned>,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
    mut asteroids: ModelQuery<(&ModelId, &Asteroid)>,
    mut blasts: ModelQuery<(&ModelId, &Blast)>,
) {
    let mut targets: Vec<(ModelId, Vec3)> = Vec::new();
    targets.extend(ships.iter().map(|(id, s)| (*id, Vec3::new(s.x, s.y, s.a))));
    targets.extend(asteroids.iter().map(|(id, a)| (*id, Vec3::new(a.x, a.y, a.a))));
    targets.extend(blasts.iter().map(|(id, b)| (*id, Vec3::new(b.x, b.y, 0.0))));
    for ModelEntityDespawned(id) in despawned.read() {
        smoothed.0.remove(id);
    }
    for (id, target) in targets {
        let value = match smoothed.0.get(&id) {
            Some(old) => {
                let d = target - *old;
                if d.x.abs() >= 50.0 || d.y.abs() >= 50.0 || d.z.abs() >= 1.0 { target } else { *old + d * 0.3 }
            }
            None => target,
        };
        smoothed.0.insert(id, value);
    }
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
    connection: Res<SynqConnection>,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
    mut asteroids: ModelQuery<(&ModelId, &Asteroid)>,
    mut blasts: ModelQuery<(&ModelId, &Blast)>,
) {
    let me = own_view(&connection);
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
        let own = Some(ship.view) == me;
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

/// The text of a ship's label.
fn label_text(ship: &Ship) -> String {
    if ship.initials.is_empty() { ship.score.to_string() } else { format!("{} {}", ship.initials, ship.score) }
}

/// A score label next to each ship, as in the tutorial: spawned when the ship appears, despawned
/// when it goes away (the change feed), kept current every frame.
fn labels(
    mut commands: Commands,
    smoothed: Res<Smoothed>,
    mut ships: ModelQuery<&Ship>,
    mut spawned: MessageReader<ModelEntitySpawned>,
    mut despawned: MessageReader<ModelEntityDespawned>,
    mut existing: Query<(Entity, &Label, &mut Text2d, &mut Transform)>,
) {
    let gone: Vec<ModelId> = despawned.read().map(|message| message.0).collect();
    for (entity, label, mut text, mut transform) in &mut existing {
        if gone.contains(&label.0) {
            commands.entity(entity).despawn();
            continue;
        }
        if let Some(ship) = ships.get_by_id(label.0) {
            let wanted = label_text(ship);
            if text.0 != wanted {
                text.0 = wanted;
            }
        }
        if let Some(at) = smoothed.0.get(&label.0) {
            transform.translation = (to_screen(at.x, at.y) + Vec2::new(26.0, 18.0)).extend(5.0);
        }
    }
    for ModelEntitySpawned(id) in spawned.read() {
        if let Some(ship) = ships.get_by_id(*id) {
            commands.spawn((
                Label(*id),
                Text2d::new(label_text(ship)),
                TextFont { font_size: FontSize::Px(16.0), ..default() },
                TextColor(Color::WHITE),
                Transform::from_xyz(-10_000.0, 0.0, 5.0),
            ));
        }
    }
}
