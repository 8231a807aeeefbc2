//! The game screen's HUD: session, players, connection state and scores in play (top left), the
//! high-score table (top right), the initials and the join link (bottom), and the link's QR code
//! (bottom right; Q shows or hides it, shown at first when this process hosts).
//!
//! The connection state comes from the plugin's [`SynqState`] and the details in
//! [`SynqConnection`] (sync progress, round trip, reconnects, why it was lost), so it is right for
//! whatever session the lobby joined. The texts are `Text2d` in world units, so they scale with
//! the world when the window is resized; the QR code is a UI image in window pixels, so its
//! modules stay crisp squares that a camera can read.

use bevy::asset::RenderAssetUsages;
use bevy::color::palettes::css::{GOLD, GRAY};
use bevy::image::ImageSampler;
use bevy::prelude::*;
use bevy::render::render_resource::{Extent3d, TextureDimension, TextureFormat};
use bevy::sprite::Anchor;
use bevy_synq::prelude::*;
use bevy_synq::{SynqConnection, SynqState};

use crate::game::{GameSystems, Initials, own_view};
use crate::model::{HighScores, Ship, WORLD};
use crate::net::Role;
use crate::view::{Current, Screen};

/// The HUD of the game screen.
pub struct HudPlugin;

impl Plugin for HudPlugin {
    fn build(&self, app: &mut App) {
        app.add_systems(OnEnter(Screen::Game), spawn_hud)
            .add_systems(Update, (hud, toggle_qr).after(GameSystems).run_if(in_state(Screen::Game)));
    }
}

/// The parts of the HUD.
#[derive(Component, Clone, Copy, PartialEq, Eq)]
enum Hud {
    /// Top left: session, players, connection state, scores in play.
    Main,
    /// Top right: the high-score table.
    HighScores,
    /// Bottom: initials, keys, join link.
    Link,
}

/// The join link's QR code.
#[derive(Component)]
struct QrPanel;

/// Screen pixels per QR module: the smallest that phones read well from a monitor.
const QR_MODULE_PX: usize = 3;

/// The standard's quiet zone around a QR code, in modules.
const QR_QUIET_ZONE: usize = 4;

fn spawn_hud(mut commands: Commands, current: Res<Current>, mut images: ResMut<Assets<Image>>) {
    commands.spawn((
        Hud::Main,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(20.0), ..default() },
        TextColor(Color::WHITE),
        Anchor::TOP_LEFT,
        Transform::from_xyz(-WORLD / 2.0 + 12.0, WORLD / 2.0 - 12.0, 10.0),
        DespawnOnExit(Screen::Game),
    ));
    commands.spawn((
        Hud::HighScores,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(20.0), ..default() },
        TextColor(Color::from(GOLD)),
        TextLayout::justify(Justify::Right),
        Anchor::TOP_RIGHT,
        Transform::from_xyz(WORLD / 2.0 - 12.0, WORLD / 2.0 - 12.0, 10.0),
        DespawnOnExit(Screen::Game),
    ));
    commands.spawn((
        Hud::Link,
        Text2d::new(""),
        TextFont { font_size: FontSize::Px(14.0), ..default() },
        TextColor(Color::from(GRAY)),
        Anchor::BOTTOM_LEFT,
        Transform::from_xyz(-WORLD / 2.0 + 12.0, -WORLD / 2.0 + 10.0, 10.0),
        DespawnOnExit(Screen::Game),
    ));
    let Some(network) = &current.network else { return };
    let Some((image, side)) = qr_image(&network.link) else { return };
    let hosting = matches!(network.role, Role::Host(_));
    commands.spawn((
        QrPanel,
        ImageNode::new(images.add(image)),
        Node {
            position_type: PositionType::Absolute,
            right: px(10),
            // Above the two lines of the link text.
            bottom: px(44),
            width: px(side),
            height: px(side),
            ..default()
        },
        if hosting { Visibility::Inherited } else { Visibility::Hidden },
        DespawnOnExit(Screen::Game),
    ));
}

/// The QR code of `link` as an image, one pixel per module (the sampler keeps them square when
/// the UI scales it), with its side in screen pixels.
fn qr_image(link: &str) -> Option<(Image, f32)> {
    let code = crate::qr::encode(link.as_bytes())?;
    let width = code.width();
    let side = width + 2 * QR_QUIET_ZONE;
    let mut data = vec![255u8; side * side * 4];
    for (i, dark) in code.modules().into_iter().enumerate() {
        if dark {
            let (x, y) = (i % width + QR_QUIET_ZONE, i / width + QR_QUIET_ZONE);
            let at = (y * side + x) * 4;
            data[at..at + 3].fill(0);
        }
    }
    let size = Extent3d { width: side as u32, height: side as u32, depth_or_array_layers: 1 };
    let mut image =
        Image::new(size, TextureDimension::D2, data, TextureFormat::Rgba8UnormSrgb, RenderAssetUsages::RENDER_WORLD);
    image.sampler = ImageSampler::nearest();
    Some((image, (side * QR_MODULE_PX) as f32))
}

/// Q shows or hides the QR code (not while typing initials: Q is a letter then).
fn toggle_qr(
    keys: Res<ButtonInput<KeyCode>>,
    initials: Res<Initials>,
    mut panels: Query<&mut Visibility, With<QrPanel>>,
) {
    if initials.editing.is_some() || !keys.just_pressed(KeyCode::KeyQ) {
        return;
    }
    for mut visibility in &mut panels {
        *visibility = match *visibility {
            Visibility::Hidden => Visibility::Inherited,
            _ => Visibility::Hidden,
        };
    }
}

/// The connection state in a few words, e.g. `syncing 40 %` or `synced, round trip 3 ms`.
pub fn connection_text(state: SynqState, connection: &SynqConnection) -> String {
    match state {
        SynqState::Disconnected => match connection.reason.as_deref() {
            Some(reason) if reason != "not in a session" => format!("not in a session ({reason})"),
            _ => "not in a session".to_string(),
        },
        SynqState::Connecting if connection.reconnects > 0 => "reconnecting".to_string(),
        SynqState::Connecting => "connecting".to_string(),
        SynqState::Syncing => format!("syncing {:.0} %", connection.progress * 100.0),
        SynqState::Synced => match connection.rtt {
            Some(rtt) => format!("synced, round trip {} ms", rtt.as_millis()),
            None => "synced".to_string(),
        },
    }
}

/// The last four digits of a view id: enough to tell players apart.
fn short(view: ViewId) -> String {
    let text = view.to_string();
    text[text.len().saturating_sub(4)..].to_string()
}

#[allow(clippy::too_many_arguments)]
fn hud(
    mut texts: Query<(&mut Text2d, &Hud)>,
    current: Res<Current>,
    initials: Res<Initials>,
    state: Res<State<SynqState>>,
    connection: Res<SynqConnection>,
    model: Model,
    mut ships: ModelQuery<(&ModelId, &Ship)>,
) {
    let (name, link) = current.network.as_ref().map_or(("", ""), |n| (n.name.as_str(), n.link.as_str()));
    let me = own_view(&connection);
    let players = model.views().map_or(0, |v| v.len());
    let mut scores: Vec<(u32, ModelId, ViewId, String)> =
        ships.iter().map(|(id, s)| (s.score, *id, s.view, s.initials.clone())).collect();
    scores.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = format!(
        "MULTIBLASTER  session \"{name}\"\n{} player{}  |  {}\n",
        players,
        if players == 1 { "" } else { "s" },
        connection_text(*state.get(), &connection)
    );
    for (score, _, view, initials) in scores.iter().take(8) {
        let who = if initials.is_empty() { format!("player {}", short(*view)) } else { initials.clone() };
        let who = if Some(*view) == me { format!("{who} (you)") } else { who };
        out.push_str(&format!("{score:>4}  {who}\n"));
    }

    let mut high = String::from("HIGH SCORES\n");
    if let Some(table) = model.resource::<HighScores>() {
        for (initials, score) in table.ranked().into_iter().take(10) {
            high.push_str(&format!("{initials:<3} {score:>5}\n"));
        }
    }

    let bottom = match &initials.editing {
        Some(typed) => format!("INITIALS: {typed}_   (1-3 letters or digits, Enter = OK, Esc = cancel)\n{link}"),
        None => format!(
            "{}   Enter: set initials   Q: QR code   Esc: leave to the lobby\njoin: {link}",
            initials.wanted.as_deref().map_or_else(|| "no initials".to_string(), |w| format!("initials {w}")),
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
