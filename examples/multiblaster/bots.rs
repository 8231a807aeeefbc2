//! Bot players: headless Bevy apps (MinimalPlugins + SynqPlugin) whose "view" is a system that
//! reads the model and publishes [`Control`] events, like a player at a keyboard would.
//!
//! The bot's own randomness and math are view-side business: the model only ever sees the events
//! the reflector stamped, so nothing here needs to be deterministic.

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::reflector::ReflectorConfig;
use bevy_synq::reflector::inproc::ManualReflector;
use bevy_synq::{ModelWorld, SynqClient};
use std::collections::BTreeMap;
use std::time::Instant;

use crate::model::{Asteroid, Control, SetInitials, Ship, WORLD};

/// A bot's state: which thrusters it holds, and its own random numbers.
#[derive(Resource)]
pub struct Bot {
    rng: u64,
    /// When `false`, the bot lets go of every control and stops publishing.
    pub active: bool,
    left: bool,
    right: bool,
    forward: bool,
    last_fire_ms: u64,
    wander_until_ms: u64,
    /// The bot's initials for the high-score table ("B1", "B2"…).
    initials: String,
    initials_sent_ms: Option<u64>,
}

impl Bot {
    /// A bot seeded with `seed`, playing as `initials`.
    pub fn new(seed: u64, initials: String) -> Self {
        Self {
            rng: seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407) | 1,
            active: true,
            left: false,
            right: false,
            forward: false,
            last_fire_ms: 0,
            wander_until_ms: 0,
            initials,
            initials_sent_ms: None,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The shortest displacement from `a` to `b` in a wrap-around world.
fn wrapped_delta(a: f32, b: f32) -> f32 {
    let mut d = b - a;
    if d > WORLD / 2.0 {
        d -= WORLD;
    } else if d < -WORLD / 2.0 {
        d += WORLD;
    }
    d
}

/// The bot's view system: steer toward the nearest asteroid, fire when facing it, sometimes
/// wander. Publishes thruster changes only when they change (as key down / key up would).
pub fn bot_input(
    mut bot: ResMut<Bot>,
    client: Res<SynqClient>,
    model: Model,
    mut ships: ModelQuery<&Ship>,
    mut asteroids: ModelQuery<&Asteroid>,
    mut publish: Publish<Control>,
) {
    if !client.is_synced() {
        return;
    }
    let me = client.ids().view;
    let now = model.now_ms();
    let Some(ship) = ships.iter().find(|ship| ship.view == me).cloned() else { return };

    let (mut left, mut right, mut forward, mut fire) = (false, false, false, false);
    if bot.active && ship.was_hit == 0 {
        let target = asteroids
            .iter()
            .filter(|a| a.was_hit == 0)
            .map(|a| (wrapped_delta(ship.x, a.x), wrapped_delta(ship.y, a.y)))
            .min_by(|p, q| (p.0 * p.0 + p.1 * p.1).total_cmp(&(q.0 * q.0 + q.1 * q.1)));
        if now < bot.wander_until_ms {
            left = bot.left;
            right = bot.right;
            forward = bot.forward;
        } else if bot.chance(2) {
            // Wander for a while: a random turn and thrust, held.
            bot.wander_until_ms = now + 300 + bot.next() % 900;
            left = bot.chance(50);
            right = !left && bot.chance(50);
            forward = bot.chance(60);
        } else if let Some((dx, dy)) = target {
            let want = dy.atan2(dx);
            let mut diff = want - ship.a;
            while diff > std::f32::consts::PI {
                diff -= std::f32::consts::TAU;
            }
            while diff < -std::f32::consts::PI {
                diff += std::f32::consts::TAU;
            }
            left = diff < -0.15;
            right = diff > 0.15;
            let distance = (dx * dx + dy * dy).sqrt();
            forward = distance > 300.0 && ship.dx.abs() + ship.dy.abs() < 4.0;
            fire = diff.abs() < 0.35 && distance < 450.0;
        }
        if !fire && bot.chance(3) {
            fire = true;
        }
    }

    if left != bot.left {
        bot.left = left;
        publish.send(Control::Left(left));
    }
    if right != bot.right {
        bot.right = right;
        publish.send(Control::Right(right));
    }
    if forward != bot.forward {
        bot.forward = forward;
        publish.send(Control::Forward(forward));
    }
    if fire && now >= bot.last_fire_ms + 350 {
        bot.last_fire_ms = now;
        publish.send(Control::Fire);
    }
}

/// Signs the bot's ship with its initials (re-sent every second until the ship carries them).
/// A system of its own: two `Publish` parameters in one system would conflict.
pub fn bot_initials(
    mut bot: ResMut<Bot>,
    client: Res<SynqClient>,
    model: Model,
    mut ships: ModelQuery<&Ship>,
    mut initials: Publish<SetInitials>,
) {
    if !client.is_synced() || !bot.active {
        return;
    }
    let me = client.ids().view;
    let now = model.now_ms();
    let Some(current) = ships.iter().find(|ship| ship.view == me).map(|s| s.initials.clone()) else { return };
    if current != bot.initials && bot.initials_sent_ms.is_none_or(|t| now >= t + 1000) {
        bot.initials_sent_ms = Some(now);
        initials.send(SetInitials(bot.initials.clone()));
    }
}

/// A headless bot client: MinimalPlugins + SynqPlugin on `reflector`, plus the bot.
pub fn bot_app(session: SessionConfig, reflector: ReflectorTarget, seed: u64, initials: String) -> App {
    let mut app = App::new();
    app.add_plugins(MinimalPlugins)
        .add_plugins(SynqPlugin::new(crate::model::model, session).with_reflector(reflector))
        .insert_resource(Bot::new(seed, initials))
        .add_systems(Update, (bot_input, bot_initials));
    app.finish();
    app.cleanup();
    app
}

/// Bot apps running on a thread of their own; dropping it stops them (their views leave).
#[cfg(feature = "render")]
pub struct BotThread {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "render")]
impl Drop for BotThread {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs bot apps on a thread of their own against the real clock (for the windowed game).
#[cfg(feature = "render")]
pub fn spawn_bot_thread(count: usize, session: SessionConfig, reflector: ReflectorTarget) -> Option<BotThread> {
    if count == 0 {
        return None;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new().name("multiblaster-bots".into()).spawn(move || {
        let mut apps: Vec<App> = (0..count)
            .map(|i| {
                let mut session = session.clone();
                session.view_id = None;
                bot_app(session, reflector.clone(), 1000 + i as u64, format!("B{}", i + 1))
            })
            .collect();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let started = Instant::now();
            for app in &mut apps {
                app.update();
            }
            let frame = std::time::Duration::from_millis(16);
            if let Some(rest) = frame.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    });
    match spawned {
        Ok(thread) => Some(BotThread { stop, thread: Some(thread) }),
        Err(e) => {
            eprintln!("multiblaster: could not start the bot thread: {e}");
            None
        }
    }
}

fn model_time(app: &App) -> u64 {
    app.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.now_ms())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `--headless --bots N --seconds S`: N bots on one in-process reflector driven by a virtual
/// clock (much faster than real time); the last bot joins late, halfway through. Prints one line
/// per client with its model time and state hash; returns whether all hashes agree.
///
/// With `leaver`, one extra bot joins at the start and quits at three quarters of the run, so its
/// ship must be removed from the model (`ViewExited`).
pub fn run_headless(session: SessionConfig, bots: usize, seconds: u64, leaver: bool) -> bool {
    let bots = bots.max(1);
    let frame_ms = 50;
    let total_ms = seconds * 1000;
    let late_at = total_ms / 2;
    let mut reflector = ManualReflector::new(ReflectorConfig::default());
    let mut now = 0u64;
    let mut apps: Vec<App> = Vec::new();
    let wall = Instant::now();

    let add = |apps: &mut Vec<App>, reflector: &ManualReflector| {
        let index = apps.len() as u64;
        let mut session = session.clone();
        session.view_id = Some(ViewId(0x6d62_0000 + index + 1));
        let target = ReflectorTarget::InProcess(reflector.handle());
        apps.push(bot_app(session, target, index + 1, format!("B{}", index + 1)));
    };
    let early = if bots >= 2 { bots - 1 } else { bots };
    for _ in 0..early {
        add(&mut apps, &reflector);
    }
    let mut leaving = leaver.then(|| {
        let mut session = session.clone();
        session.view_id = Some(ViewId(0x6d62_ffff));
        bot_app(session, ReflectorTarget::InProcess(reflector.handle()), 0xffff, "BX".into())
    });
    let leave_at = total_ms * 3 / 4;

    let round = |apps: &mut Vec<App>, reflector: &mut ManualReflector, now: u64| {
        reflector.pump(now);
        for app in apps.iter_mut() {
            app.update();
        }
        reflector.pump(now);
    };

    while now < total_ms {
        now += frame_ms;
        if apps.len() < bots && now >= late_at {
            add(&mut apps, &reflector);
            eprintln!("late joiner added at {now} ms");
        }
        if let Some(app) = leaving.as_mut() {
            app.update();
        }
        if now >= leave_at && leaving.take().is_some() {
            eprintln!("the extra bot left at {now} ms");
        }
        round(&mut apps, &mut reflector, now);
    }

    // Stop the bots, let the last events go through, then settle: no new time, every replica
    // executes everything the reflector sent.
    for app in &mut apps {
        app.world_mut().resource_mut::<Bot>().active = false;
    }
    for _ in 0..4 {
        now += frame_ms;
        round(&mut apps, &mut reflector, now);
    }
    let mut settled = false;
    for _ in 0..2000 {
        round(&mut apps, &mut reflector, now);
        if apps.iter().all(|app| {
            let client = app.world().resource::<SynqClient>();
            client.is_synced() && model_time(app) == client.reflector_time()
        }) {
            round(&mut apps, &mut reflector, now);
            settled = true;
            break;
        }
    }
    if !settled {
        eprintln!("replicas did not settle");
    }

    let mut hashes = Vec::new();
    for app in &mut apps {
        let view = app.world().resource::<SynqClient>().ids().view;
        let time = model_time(app);
        let hash = app
            .world_mut()
            .resource_mut::<ModelWorld>()
            .state_hash()
            .and_then(Result::ok)
            .map_or_else(|| "none".to_string(), |h| hex(&h));
        println!("client {view} time {time} hash {hash}");
        hashes.push((time, hash));
    }

    // Every snapshot point that several replicas passed must have the same hash everywhere.
    let mut points: BTreeMap<(u64, u32), Vec<[u8; 32]>> = BTreeMap::new();
    for app in &apps {
        for record in app.world().resource::<SynqClient>().hash_history() {
            points.entry((record.time, record.seq)).or_default().push(record.hash);
        }
    }
    let shared = points.values().filter(|hashes| hashes.len() > 1).count();
    let disagreements = points.values().filter(|hashes| hashes.windows(2).any(|w| w[0] != w[1])).count();
    if disagreements > 0 {
        eprintln!("{disagreements} snapshot points with differing hashes");
    }
    for app in &apps {
        let client = app.world().resource::<SynqClient>();
        eprintln!("client {} started from {:?}", client.ids().view, client.started_from());
    }
    if let Some(app) = apps.first() {
        let world = app.world().resource::<ModelWorld>();
        if let Some(runtime) = world.runtime() {
            let model = runtime.world();
            let stats = model.resource::<crate::model::Stats>();
            let ships = model.iter_entities().filter(|e| e.contains::<Ship>()).count();
            eprintln!(
                "{} clients, {} ships in the model; {} s of session time in {:.1} s wall; asteroids hit {}, \
                 ships hit {}, blasts fired {}; {} shared snapshot points",
                apps.len(),
                ships,
                seconds,
                wall.elapsed().as_secs_f32(),
                stats.asteroids_hit,
                stats.ships_hit,
                stats.blasts_fired,
                shared
            );
            let high = model.resource::<crate::model::HighScores>();
            let table: Vec<String> = high.ranked().iter().map(|(k, v)| format!("{k} {v}")).collect();
            eprintln!("high scores: {}", table.join(", "));
        }
    }
    check_new_version(&session, &mut reflector, now, apps.first());
    settled && disagreements == 0 && hashes.windows(2).all(|w| w[0] == w[1]) && hashes.iter().all(|(_, h)| h != "none")
}

/// Tutorial step 8, checked: a new version of the game (other model code, so a new session of the
/// same app id and name) starts from the high scores the old one persisted. Informational only
/// (stderr).
fn check_new_version(session: &SessionConfig, reflector: &mut ManualReflector, mut now: u64, old: Option<&App>) {
    let old_table = old
        .and_then(|app| app.world().resource::<ModelWorld>().runtime().map(|r| r.world()))
        .and_then(|world| world.get_resource::<crate::model::HighScores>())
        .cloned()
        .unwrap_or_default();
    let mut next = session.clone().with_model_source("next-version", "a new build of the game");
    next.view_id = Some(ViewId(0x6d62_7632));
    let mut app = bot_app(next, ReflectorTarget::InProcess(reflector.handle()), 0x7632, "NV".into());
    app.world_mut().resource_mut::<Bot>().active = false;
    for _ in 0..400 {
        now += 50;
        reflector.pump(now);
        app.update();
        reflector.pump(now);
        if app.world().resource::<SynqClient>().is_synced() {
            break;
        }
    }
    let world = app.world().resource::<ModelWorld>();
    let Some(table) = world.runtime().and_then(|r| r.world().get_resource::<crate::model::HighScores>()) else {
        eprintln!("new version: did not start");
        return;
    };
    let entries: Vec<String> = table.ranked().iter().map(|(k, v)| format!("{k} {v}")).collect();
    let consistent = table.table.iter().all(|(k, v)| old_table.table.get(k).is_some_and(|best| v <= best));
    eprintln!(
        "new version (a new session of the same name) started with {} persisted high scores: {}{}",
        entries.len(),
        entries.join(", "),
        if consistent { "" } else { " — NOT a subset of the old session's table!" }
    );
}
