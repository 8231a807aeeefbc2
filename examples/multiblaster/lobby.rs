//! The lobby: the start screen, where the player picks a game.
//!
//! Three ways to play, one row each, and the settings they use:
//!
//! * **Host a game** — starts a UDP reflector in this process (only now, so an idle lobby holds no
//!   port) and joins it; the game shows the join link and its QR code for the others.
//! * **Join by link** — the `synq://host:port/app/name#pw=…` link a host shows: it names the
//!   reflector, the session and its password.
//! * **Join reflector** — a standalone `synq-reflector` at `host:port`, in the session named by
//!   *Session name* and *Password* (both random when empty; a name of your own keeps its
//!   high-score table across versions of the game).
//!
//! *Bot players* join each session with you, and *Initials* sign your ship.
//!
//! It is driven by the keyboard, which works the same on a desktop and under Xvfb in CI: Up /
//! Down or Tab / Shift+Tab choose a row, Enter acts (on a settings row it moves on), typing edits
//! the chosen field, Backspace deletes, Esc clears the field, Left / Right change the bot count,
//! and Ctrl+V pastes from the system clipboard through `wl-paste`, `xclip` or `xsel` when one is
//! installed (Bevy's own clipboard needs a feature this example does not enable). The mouse
//! works too: a click chooses a row, and acts on *Host a game* and *Quit*.
//!
//! Text comes from [`KeyboardInput`] messages, not from [`ButtonInput`], so key repeat works for
//! typing and Backspace, and the keyboard layout decides which character a key types. The lobby
//! shows the connection state ([`SynqState`], [`SynqConnection`]) and why the last session ended.

use bevy::color::palettes::css::{GOLD, ORANGE};
use bevy::input::ButtonState;
use bevy::input::keyboard::KeyboardInput;
use bevy::prelude::*;
use bevy_synq::{SynqConnection, SynqSession, SynqState};

use crate::game::Initials;
use crate::model::clean_initials;
use crate::net::Network;
use crate::view::{Current, Screen};

/// The lobby, with its fields filled in from the command line.
pub struct LobbyPlugin {
    /// `--name`.
    pub name: String,
    /// `--password`.
    pub password: String,
    /// `--reflector`.
    pub reflector: String,
    /// `--bots`.
    pub bots: usize,
}

impl Plugin for LobbyPlugin {
    fn build(&self, app: &mut App) {
        app.insert_resource(LobbyForm {
            focus: 0,
            link: String::new(),
            reflector: self.reflector.clone(),
            name: self.name.clone(),
            password: self.password.clone(),
            bots: self.bots.min(MAX_BOTS),
            initials: String::new(),
            note: None,
            fresh: true,
        })
        .add_message::<Activate>()
        .add_systems(OnEnter(Screen::Lobby), spawn_lobby)
        .add_systems(Update, (lobby_keys, lobby_mouse, lobby_act, lobby_show).chain().run_if(in_state(Screen::Lobby)));
    }
}

/// The most bot players the lobby offers.
const MAX_BOTS: usize = 8;

/// The lobby's rows, top to bottom.
#[derive(Component, Clone, Copy, PartialEq, Eq, Debug)]
enum Item {
    Host,
    Link,
    Reflector,
    Name,
    Password,
    Bots,
    Initials,
    Quit,
}

const ITEMS: [Item; 8] =
    [Item::Host, Item::Link, Item::Reflector, Item::Name, Item::Password, Item::Bots, Item::Initials, Item::Quit];

impl Item {
    fn label(self) -> &'static str {
        match self {
            Item::Host => "Host a game",
            Item::Link => "Join by link",
            Item::Reflector => "Join reflector",
            Item::Name => "Session name",
            Item::Password => "Password",
            Item::Bots => "Bot players",
            Item::Initials => "Initials",
            Item::Quit => "Quit",
        }
    }

    /// What the row does, shown under the rows while it is chosen.
    fn hint(self) -> &'static str {
        match self {
            Item::Host => "Enter: run a reflector here and play; others join with the link the game shows",
            Item::Link => "Type or paste (Ctrl+V) the synq://... link a host shows, then Enter",
            Item::Reflector => "host:port of a synq-reflector, then Enter; uses the session name and password",
            Item::Name => "For hosting and reflectors; empty: random. Keep one to keep its high scores",
            Item::Password => "For hosting and reflectors; empty: random. It travels in the link",
            Item::Bots => "Left / Right: bot players that join each session with you",
            Item::Initials => "1-3 letters or digits for the high-score table",
            Item::Quit => "Enter: close the game",
        }
    }

    /// Shown in an empty field.
    fn placeholder(self) -> &'static str {
        match self {
            Item::Link => "synq://host:port/app/name#pw=...",
            Item::Reflector => "host:port",
            Item::Name | Item::Password => "(random)",
            Item::Initials => "(none)",
            _ => "",
        }
    }

    /// The longest text the field takes.
    fn max_len(self) -> usize {
        match self {
            Item::Link => 512,
            Item::Reflector => 255,
            Item::Name | Item::Password => 64,
            Item::Initials => 3,
            _ => 0,
        }
    }
}

/// What the player typed and chose; kept while playing, so the lobby comes back as it was left.
#[derive(Resource)]
pub struct LobbyForm {
    /// The chosen row, an index into [`ITEMS`].
    focus: usize,
    link: String,
    reflector: String,
    name: String,
    password: String,
    bots: usize,
    /// The initials field (the game's [`Initials`] follow it).
    initials: String,
    /// Why the last attempt failed or the last session ended.
    pub note: Option<String>,
    /// Just entered: drop the key messages still buffered from the game screen.
    fresh: bool,
}

impl LobbyForm {
    fn item(&self) -> Item {
        ITEMS[self.focus]
    }

    fn move_focus(&mut self, by: isize) {
        self.focus = (self.focus as isize + by).rem_euclid(ITEMS.len() as isize) as usize;
    }

    fn field(&self, item: Item) -> Option<&String> {
        match item {
            Item::Link => Some(&self.link),
            Item::Reflector => Some(&self.reflector),
            Item::Name => Some(&self.name),
            Item::Password => Some(&self.password),
            Item::Initials => Some(&self.initials),
            _ => None,
        }
    }

    fn field_mut(&mut self, item: Item) -> Option<&mut String> {
        match item {
            Item::Link => Some(&mut self.link),
            Item::Reflector => Some(&mut self.reflector),
            Item::Name => Some(&mut self.name),
            Item::Password => Some(&mut self.password),
            Item::Initials => Some(&mut self.initials),
            _ => None,
        }
    }

    /// Adds typed or pasted text to the chosen field, within its length; initials keep letters
    /// and digits only, upper case.
    fn type_text(&mut self, text: &str) {
        let item = self.item();
        let Some(field) = self.field_mut(item) else { return };
        for c in text.chars().filter(|c| !c.is_control()) {
            if field.chars().count() >= item.max_len() {
                break;
            }
            if item == Item::Initials {
                if c.is_ascii_alphanumeric() {
                    field.push(c.to_ascii_uppercase());
                }
            } else {
                field.push(c);
            }
        }
    }
}

/// A row acted on (Enter or a click).
#[derive(Message, Clone, Copy)]
struct Activate(Item);

/// A lobby row; its children show the label and the value.
#[derive(Component)]
struct Row(Item);

#[derive(Component)]
struct RowLabel(Item);

#[derive(Component)]
struct RowValue(Item);

/// The texts under the rows.
#[derive(Component, Clone, Copy, PartialEq, Eq)]
enum Info {
    /// What the chosen row does.
    Hint,
    /// The connection state.
    Status,
    /// Why the last attempt failed or the last session ended.
    Note,
}

const BACKGROUND: Color = Color::BLACK;
const ROW: Color = Color::srgb(0.06, 0.06, 0.08);
const ROW_FOCUS: Color = Color::srgb(0.13, 0.15, 0.24);
const TEXT: Color = Color::srgb(0.88, 0.88, 0.9);
const DIM: Color = Color::srgb(0.45, 0.45, 0.5);

fn spawn_lobby(mut commands: Commands, mut form: ResMut<LobbyForm>, initials: Res<Initials>) {
    form.fresh = true;
    form.initials = initials.wanted.clone().unwrap_or_default();
    let text = |value: &str, size: f32, color: Color| {
        (Text::new(value), TextFont { font_size: FontSize::Px(size), ..default() }, TextColor(color))
    };
    commands
        .spawn((
            DespawnOnExit(Screen::Lobby),
            Node {
                width: percent(100),
                height: percent(100),
                flex_direction: FlexDirection::Column,
                align_items: AlignItems::Center,
                justify_content: JustifyContent::Center,
                row_gap: px(4),
                padding: px(20).all(),
                ..default()
            },
            BackgroundColor(BACKGROUND),
        ))
        .with_children(|root| {
            root.spawn(text("MULTIBLASTER", 52.0, Color::WHITE));
            root.spawn((
                text("one replicated model, every player runs it; the reflector only relays", 14.0, DIM),
                Node { margin: UiRect::bottom(px(18)), ..default() },
            ));
            for item in ITEMS {
                root.spawn((
                    Row(item),
                    Button,
                    Node {
                        width: px(640),
                        height: px(36),
                        padding: UiRect::horizontal(px(12)),
                        border: UiRect::all(px(1)),
                        column_gap: px(12),
                        align_items: AlignItems::Center,
                        // A long value never spills out of its row.
                        overflow: Overflow::clip(),
                        ..default()
                    },
                    BackgroundColor(ROW),
                    BorderColor::all(ROW),
                ))
                .with_children(|row| {
                    row.spawn((
                        RowLabel(item),
                        text(item.label(), 18.0, TEXT),
                        TextLayout::no_wrap(),
                        Node { width: px(170), ..default() },
                    ));
                    row.spawn((RowValue(item), text("", 18.0, TEXT), TextLayout::no_wrap()));
                });
            }
            root.spawn((Info::Hint, text("", 14.0, DIM), Node { margin: UiRect::top(px(10)), ..default() }));
            root.spawn((Info::Status, text("", 16.0, TEXT), Node { margin: UiRect::top(px(18)), ..default() }));
            root.spawn((Info::Note, text("", 16.0, Color::from(ORANGE))));
            root.spawn((
                text("Up/Down, Tab: choose   Enter: go   type to edit   Esc: clear   Ctrl+V: paste", 13.0, DIM),
                Node { margin: UiRect::top(px(18)), ..default() },
            ));
        });
}

/// The keyboard: moving between rows, editing fields, acting.
fn lobby_keys(
    mut typing: MessageReader<KeyboardInput>,
    keys: Res<ButtonInput<KeyCode>>,
    mut form: ResMut<LobbyForm>,
    mut initials: ResMut<Initials>,
    mut activate: MessageWriter<Activate>,
) {
    let events: Vec<KeyboardInput> = typing.read().filter(|e| e.state == ButtonState::Pressed).cloned().collect();
    if std::mem::take(&mut form.fresh) {
        return;
    }
    let ctrl = keys.any_pressed([KeyCode::ControlLeft, KeyCode::ControlRight, KeyCode::SuperLeft, KeyCode::SuperRight]);
    let shift = keys.any_pressed([KeyCode::ShiftLeft, KeyCode::ShiftRight]);
    let initials_before = form.initials.clone();
    for event in events {
        let item = form.item();
        match event.key_code {
            KeyCode::Enter | KeyCode::NumpadEnter => {
                if event.repeat {
                    continue;
                }
                match item {
                    Item::Host | Item::Link | Item::Reflector | Item::Quit => {
                        activate.write(Activate(item));
                    }
                    _ => form.move_focus(1),
                }
            }
            KeyCode::Tab => form.move_focus(if shift { -1 } else { 1 }),
            KeyCode::ArrowDown => form.move_focus(1),
            KeyCode::ArrowUp => form.move_focus(-1),
            KeyCode::ArrowLeft if item == Item::Bots => form.bots = form.bots.saturating_sub(1),
            KeyCode::ArrowRight if item == Item::Bots => form.bots = (form.bots + 1).min(MAX_BOTS),
            KeyCode::Backspace => {
                if let Some(field) = form.field_mut(item) {
                    field.pop();
                }
            }
            KeyCode::Escape => {
                if let Some(field) = form.field_mut(item) {
                    field.clear();
                }
            }
            KeyCode::KeyV if ctrl => match paste() {
                Ok(text) => form.type_text(&text),
                Err(message) => form.note = Some(message),
            },
            _ if !ctrl => {
                if let Some(text) = &event.text {
                    form.type_text(text);
                }
            }
            _ => {}
        }
    }
    if form.initials != initials_before {
        let clean = clean_initials(&form.initials);
        initials.set((!clean.is_empty()).then_some(clean));
    }
}

/// Reads the system clipboard's text through the usual command-line tools.
fn paste() -> Result<String, String> {
    let tools: &[&[&str]] = if cfg!(target_os = "macos") {
        &[&["pbpaste"]]
    } else if cfg!(windows) {
        &[&["powershell", "-NoProfile", "-Command", "Get-Clipboard"]]
    } else {
        &[
            &["wl-paste", "--no-newline"],
            &["xclip", "-selection", "clipboard", "-o"],
            &["xsel", "--clipboard", "--output"],
        ]
    };
    for tool in tools {
        let Ok(output) = std::process::Command::new(tool[0]).args(&tool[1..]).output() else { continue };
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            return Ok(text.lines().map(str::trim).find(|line| !line.is_empty()).unwrap_or_default().to_string());
        }
    }
    Err("Pasting needs wl-paste, xclip or xsel; type the text instead".into())
}

/// The mouse: a click chooses a row, and acts on the rows that are buttons.
fn lobby_mouse(
    rows: Query<(&Interaction, &Row), Changed<Interaction>>,
    mut form: ResMut<LobbyForm>,
    mut activate: MessageWriter<Activate>,
) {
    for (interaction, row) in &rows {
        if *interaction == Interaction::Pressed {
            form.focus = ITEMS.iter().position(|item| *item == row.0).unwrap_or(0);
            if matches!(row.0, Item::Host | Item::Quit) {
                activate.write(Activate(row.0));
            }
        }
    }
}

/// The trimmed text of a field, `None` when empty.
fn given(text: &str) -> Option<&str> {
    Some(text.trim()).filter(|text| !text.is_empty())
}

/// Acts on a row: opens the network for the chosen way to play and joins, or quits.
fn lobby_act(
    mut activations: MessageReader<Activate>,
    mut form: ResMut<LobbyForm>,
    mut session: SynqSession,
    mut current: ResMut<Current>,
    mut screen: ResMut<NextState<Screen>>,
    mut exits: MessageWriter<AppExit>,
) {
    for Activate(item) in activations.read().copied() {
        let (name, password) = (given(&form.name), given(&form.password));
        let opened = match item {
            Item::Host => Network::open(None, None, name, password),
            Item::Link => match given(&form.link) {
                // A link without `#pw=` takes the password field.
                Some(link) => Network::open(Some(link), None, None, password),
                None => Err("Type or paste a synq:// link first".into()),
            },
            Item::Reflector => match given(&form.reflector) {
                Some(address) => Network::open(None, Some(address), name, password),
                None => Err("Type the reflector's host:port first".into()),
            },
            Item::Quit => {
                exits.write(AppExit::Success);
                return;
            }
            _ => continue,
        };
        match opened {
            Ok(network) => {
                form.note = None;
                crate::view::join(network, form.bots, &mut session, &mut current, &mut screen);
                return;
            }
            // The messages name the command-line options they come from; here they come from a row.
            Err(message) => {
                let message = message.trim_start_matches("--join: ").trim_start_matches("--reflector: ");
                form.note = Some(format!("{}: {message}", item.label()));
            }
        }
    }
}

/// Shows the form: the chosen row highlighted, the fields' texts (the end of a long one), the
/// hint, the connection state and the note.
#[allow(clippy::type_complexity)]
fn lobby_show(
    form: Res<LobbyForm>,
    state: Res<State<SynqState>>,
    connection: Res<SynqConnection>,
    mut rows: Query<(&Row, &mut BackgroundColor, &mut BorderColor)>,
    mut labels: Query<(&RowLabel, &mut TextColor), (Without<RowValue>, Without<Info>)>,
    mut values: Query<(&RowValue, &mut Text, &mut TextColor), (Without<RowLabel>, Without<Info>)>,
    mut infos: Query<(&Info, &mut Text), Without<RowValue>>,
) {
    let chosen = form.item();
    for (row, mut background, mut border) in &mut rows {
        let (fill, edge) = if row.0 == chosen { (ROW_FOCUS, Color::from(GOLD)) } else { (ROW, ROW) };
        background.set_if_neq(BackgroundColor(fill));
        border.set_if_neq(BorderColor::all(edge));
    }
    for (label, mut color) in &mut labels {
        color.set_if_neq(TextColor(if label.0 == chosen { Color::from(GOLD) } else { TEXT }));
    }
    for (value, mut text, mut color) in &mut values {
        let item = value.0;
        let (shown, shade) = match (item, form.field(item)) {
            (Item::Bots, _) => (format!("<  {}  >", form.bots), TEXT),
            (Item::Host, _) => (
                match given(&form.name) {
                    Some(name) if name.chars().count() > 22 => {
                        format!("as session \"{}...\"", name.chars().take(20).collect::<String>())
                    }
                    Some(name) => format!("as session \"{name}\""),
                    None => String::new(),
                },
                DIM,
            ),
            (_, Some(field)) if field.is_empty() && item != chosen => (item.placeholder().to_string(), DIM),
            (_, Some(field)) => {
                // The end of a long field, where typing happens; the row has room for 38 characters.
                let tail: String = field.chars().rev().take(34).collect::<Vec<_>>().into_iter().rev().collect();
                let shown = if tail.len() < field.len() { format!("...{tail}") } else { tail };
                (if item == chosen { format!("{shown}_") } else { shown }, TEXT)
            }
            _ => (String::new(), TEXT),
        };
        if text.0 != shown {
            text.0 = shown;
        }
        color.set_if_neq(TextColor(shade));
    }
    for (info, mut text) in &mut infos {
        let shown = match info {
            Info::Hint => chosen.hint().to_string(),
            Info::Status => format!("Connection: {}", crate::hud::connection_text(*state.get(), &connection)),
            Info::Note => form.note.clone().unwrap_or_default(),
        };
        if text.0 != shown {
            text.0 = shown;
        }
    }
}
