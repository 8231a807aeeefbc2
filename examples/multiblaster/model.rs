//! The Multiblaster model: the replicated, deterministic part of the game.
//!
//! It follows the Croquet tutorial `1_6_multiblaster` (step 9) number for number: a 1000×1000
//! wrap-around world stepped every 50 ms, one ship per view, blasts that live 30 steps, asteroids
//! that split when hit, debris counters (`was_hit`), scores, a safe zone at the centre and at
//! least five asteroids alive.
//!
//! Step 8 of the tutorial, high scores that survive new versions: players publish their initials
//! ([`SetInitials`]); the model keeps the best score per initials in [`HighScores`] (a
//! `BTreeMap`, so canonical), persists it with [`PersistSession`] whenever it changes, and
//! `ModelInit` starts from the persisted table ([`Persisted<HighScores>`]) — so a new build of the
//! game (a new session, since the session id hashes the code) keeps the table.
//!
//! The model's rules: randomness only from [`ModelRng`], transcendental math only through
//! [`bevy_synq::math`], entities referred to by [`ModelId`], and every loop over entities whose
//! outcome depends on order goes in `ModelId` order.

use bevy::prelude::*;
use bevy_synq::math;
use bevy_synq::prelude::*;
use bevy_synq::{Migrations, PersistSession, Persisted};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::f32::consts::{PI, TAU};

/// Width and height of the world; positions wrap around at its edges.
pub const WORLD: f32 = 1000.0;
/// Ship acceleration per step while thrusting.
pub const SHIP_ACCELERATION: f32 = 0.5;
/// Ship turn per step, in radians.
pub const SHIP_TURN_SPEED: f32 = 0.2;
/// Maximum |dx| and |dy| of a ship.
pub const SHIP_MAX_SPEED: f32 = 10.0;
/// Half the size of a ship's collision box.
pub const SHIP_SIZE: f32 = 10.0;
/// Steps a hit ship drifts as debris before it respawns (3 s).
pub const SHIP_DEBRIS_STEPS: u32 = 60;
/// Manhattan radius of the safe zone around the centre (ships with score 0 cannot be hit in it).
pub const SAFE_ZONE: f32 = 40.0;
/// Blast speed per step.
pub const BLAST_SPEED: f32 = 20.0;
/// Steps a blast lives (1.5 s).
pub const BLAST_STEPS: u32 = 30;
/// Size of a new asteroid.
pub const ASTEROID_SIZE: f32 = 40.0;
/// Asteroids at most this size become debris when hit instead of splitting.
pub const ASTEROID_MIN_SIZE: f32 = 20.0;
/// The model keeps at least this many asteroids alive.
pub const MIN_ASTEROIDS: usize = 5;
/// The version of the persisted [`HighScores`] document.
pub const HIGH_SCORES_VERSION: u32 = 1;
/// At most this many initials are kept in the high-score table (the best ones).
pub const HIGH_SCORES_KEPT: usize = 100;

/// A player's ship.
#[derive(Component, Serialize, Deserialize, Clone, Debug)]
pub struct Ship {
    /// The view that flies it.
    pub view: ViewId,
    pub x: f32,
    pub y: f32,
    /// Heading in radians (canvas convention: y grows downwards).
    pub a: f32,
    pub dx: f32,
    pub dy: f32,
    pub left: bool,
    pub right: bool,
    pub forward: bool,
    /// 0 while intact; counts steps since the ship was hit.
    pub was_hit: u32,
    pub score: u32,
    /// The player's initials (1–3 of `A–Z 0–9`), empty until set with [`SetInitials`].
    pub initials: String,
}

/// An asteroid (or, while `was_hit > 0`, its debris).
#[derive(Component, Serialize, Deserialize, Clone, Debug)]
pub struct Asteroid {
    pub x: f32,
    pub y: f32,
    pub a: f32,
    pub dx: f32,
    pub dy: f32,
    pub da: f32,
    pub size: f32,
    /// 0 while intact; counts steps since it was destroyed (debris lasts `size` steps).
    pub was_hit: u32,
}

/// A shot from a ship's blaster.
#[derive(Component, Serialize, Deserialize, Clone, Debug)]
pub struct Blast {
    pub x: f32,
    pub y: f32,
    pub dx: f32,
    pub dy: f32,
    /// The ship that fired it, by stable id.
    pub ship: ModelId,
    /// Steps since it was fired.
    pub t: u32,
}

/// Session-wide counters, for the HUD and the headless summary.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
pub struct Stats {
    pub asteroids_hit: u64,
    pub ships_hit: u64,
    pub blasts_fired: u64,
}

/// The high-score table: the best score ever reached per initials. It is also the persisted
/// document (version [`HIGH_SCORES_VERSION`]): plain data, no ids.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct HighScores {
    /// Initials → best score.
    pub table: BTreeMap<String, u32>,
}

impl HighScores {
    /// The entries, best first (ties by initials).
    pub fn ranked(&self) -> Vec<(&str, u32)> {
        let mut entries: Vec<(&str, u32)> = self.table.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        entries
    }
}

/// Whether the high-score table changed since it was last persisted.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug)]
pub struct HighScoresDirty(pub bool);

/// A view sets its player's initials. The model keeps only `A–Z 0–9` (upper-cased), at most 3.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SetInitials(pub String);

/// Initials as the model keeps them: upper-case `A–Z 0–9`, at most 3 characters.
pub fn clean_initials(text: &str) -> String {
    text.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).take(3).collect()
}

/// What a view sends: the tutorial's thruster booleans (sent on key down / key up) and firing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Left(bool),
    Right(bool),
    Forward(bool),
    Fire,
}

/// The model plugin.
pub fn model(model: &mut ModelApp) {
    model
        .register_component::<Ship>()
        .register_component::<Asteroid>()
        .register_component::<Blast>()
        .init_resource::<Stats>()
        .init_resource::<HighScores>()
        .init_resource::<HighScoresDirty>()
        .add_view_event::<Control>()
        .add_view_event::<SetInitials>()
        .add_persistence(Migrations::<HighScores>::new(HIGH_SCORES_VERSION))
        .add_systems(ModelInit, init)
        .add_systems(
            ModelUpdate,
            (move_ships, move_asteroids, move_blasts, check_collisions, keep_asteroids, record_high_scores).chain(),
        )
        .add_observer(on_join)
        .add_observer(on_exit)
        .add_observer(on_control)
        .add_observer(on_initials);
}

fn wrap(v: f32) -> f32 {
    let w = v.rem_euclid(WORLD);
    // rem_euclid can round up to WORLD itself for tiny negative inputs.
    if w >= WORLD { 0.0 } else { w }
}

/// A new asteroid near the top-left corner (it wraps into view), like the tutorial's.
fn new_asteroid(rng: &mut ModelRng) -> Asteroid {
    let x = rng.range_f32(-200.0, 200.0);
    let y = rng.range_f32(-200.0, 200.0);
    let a = rng.range_f32(0.0, TAU);
    let speed = rng.range_f32(1.0, 5.0);
    let spin = rng.range_f32(0.02, 0.05);
    let da = if rng.bool() { spin } else { -spin };
    Asteroid {
        x: wrap(x),
        y: wrap(y),
        a,
        dx: math::cos(a) * speed,
        dy: math::sin(a) * speed,
        da,
        size: ASTEROID_SIZE,
        was_hit: 0,
    }
}

fn init(
    mut commands: Commands,
    mut rng: ResMut<ModelRng>,
    persisted: Option<Res<Persisted<HighScores>>>,
    mut high_scores: ResMut<HighScores>,
    mut persist: PersistSession,
) {
    if let Some(document) = persisted.as_ref().and_then(|p| p.data.as_ref()) {
        *high_scores = document.clone();
        // While loading this only records the document, so it is not uploaded again unchanged.
        let _ = persist.persist(&*high_scores);
    }
    for _ in 0..MIN_ASTEROIDS {
        commands.spawn(new_asteroid(&mut rng));
    }
}

impl Ship {
    fn new(view: ViewId, rng: &mut ModelRng) -> Self {
        let mut ship = Ship {
            view,
            x: 0.0,
            y: 0.0,
            a: 0.0,
            dx: 0.0,
            dy: 0.0,
            left: false,
            right: false,
            forward: false,
            was_hit: 0,
            score: 0,
            initials: String::new(),
        };
        ship.reset(rng);
        ship
    }

    /// Back to the centre, intact, score 0.
    fn reset(&mut self, rng: &mut ModelRng) {
        self.x = 480.0 + rng.range_f32(0.0, 40.0);
        self.y = 480.0 + rng.range_f32(0.0, 40.0);
        self.a = -PI / 2.0;
        self.dx = 0.0;
        self.dy = 0.0;
        self.was_hit = 0;
        self.score = 0;
    }

    fn accelerate(&mut self, acceleration: f32) {
        self.dx = (self.dx + math::cos(self.a) * acceleration).clamp(-SHIP_MAX_SPEED, SHIP_MAX_SPEED);
        self.dy = (self.dy + math::sin(self.a) * acceleration).clamp(-SHIP_MAX_SPEED, SHIP_MAX_SPEED);
    }

    /// Whether the ship is in the safe zone, where it cannot be hit while its score is 0.
    pub fn is_safe(&self) -> bool {
        self.score == 0 && (self.x - 500.0).abs() + (self.y - 500.0).abs() < SAFE_ZONE
    }
}

fn on_join(joined: On<ViewJoined>, mut commands: Commands, mut rng: ResMut<ModelRng>) {
    commands.spawn(Ship::new(joined.view, &mut rng));
}

fn on_exit(exited: On<ViewExited>, ships: Query<(Entity, &Ship)>, mut commands: Commands) {
    for (entity, ship) in &ships {
        if ship.view == exited.view {
            commands.entity(entity).despawn();
        }
    }
}

fn on_control(
    control: On<FromView<Control>>,
    mut ships: Query<(&ModelId, &mut Ship)>,
    mut commands: Commands,
    mut stats: ResMut<Stats>,
) {
    // A view has one ship; should there ever be two, the lowest id wins.
    let Some((id, mut ship)) =
        ships.iter_mut().filter(|(_, ship)| ship.view == control.view).min_by_key(|(id, _)| **id)
    else {
        return;
    };
    match control.event {
        Control::Left(on) => ship.left = on,
        Control::Right(on) => ship.right = on,
        Control::Forward(on) => ship.forward = on,
        Control::Fire => {
            if ship.was_hit > 0 {
                return;
            }
            let (cos, sin) = math::direction(ship.a);
            commands.spawn(Blast {
                x: wrap(ship.x + cos * 20.0),
                y: wrap(ship.y + sin * 20.0),
                dx: cos * BLAST_SPEED,
                dy: sin * BLAST_SPEED,
                ship: *id,
                t: 0,
            });
            stats.blasts_fired += 1;
            ship.accelerate(-SHIP_ACCELERATION);
        }
    }
}

fn on_initials(set: On<FromView<SetInitials>>, mut ships: Query<&mut Ship>) {
    let initials = clean_initials(&set.event.0);
    if initials.is_empty() {
        return;
    }
    for mut ship in &mut ships {
        if ship.view == set.view && ship.initials != initials {
            ship.initials = initials.clone();
        }
    }
}

/// Enters every ship's score that beats its initials' best, and persists the table when it
/// changed. (With an explicit flag, not change detection: whether a persist call happens must not
/// depend on whether this replica just loaded a snapshot.)
fn record_high_scores(
    ships: Query<(&ModelId, &Ship)>,
    mut high_scores: ResMut<HighScores>,
    mut dirty: ResMut<HighScoresDirty>,
    mut persist: PersistSession,
) {
    let mut all: Vec<(&ModelId, &Ship)> = ships.iter().filter(|(_, s)| !s.initials.is_empty() && s.score > 0).collect();
    all.sort_by_key(|(id, _)| **id);
    let mut changed = false;
    for (_, ship) in all {
        let best = high_scores.table.get(&ship.initials).copied().unwrap_or(0);
        if ship.score > best {
            high_scores.table.insert(ship.initials.clone(), ship.score);
            changed = true;
        }
    }
    if changed && high_scores.table.len() > HIGH_SCORES_KEPT {
        let keep: Vec<String> =
            high_scores.ranked().into_iter().take(HIGH_SCORES_KEPT).map(|(k, _)| k.to_string()).collect();
        high_scores.table.retain(|k, _| keep.contains(k));
    }
    if changed && !dirty.0 {
        dirty.0 = true;
    }
    if !dirty.0 {
        return;
    }
    dirty.0 = false;
    if let Err(e) = persist.persist(&*high_scores) {
        // Disabled (the stored table failed to load): play on without saving.
        tracing::debug!("multiblaster: high scores not persisted: {e}");
    }
}

fn move_ships(mut ships: Query<(&ModelId, &mut Ship)>, mut rng: ResMut<ModelRng>) {
    // Respawning draws from the RNG: go in ModelId order.
    let mut all: Vec<_> = ships.iter_mut().collect();
    all.sort_by_key(|(id, _)| **id);
    for (_, mut ship) in all {
        if ship.was_hit > 0 {
            ship.was_hit += 1;
            if ship.was_hit > SHIP_DEBRIS_STEPS {
                ship.reset(&mut rng);
                continue;
            }
        } else {
            if ship.forward {
                ship.accelerate(SHIP_ACCELERATION);
            }
            if ship.left {
                ship.a -= SHIP_TURN_SPEED;
            }
            if ship.right {
                ship.a += SHIP_TURN_SPEED;
            }
            ship.a = ship.a.rem_euclid(TAU);
        }
        ship.x = wrap(ship.x + ship.dx);
        ship.y = wrap(ship.y + ship.dy);
    }
}

fn move_asteroids(mut asteroids: Query<(Entity, &mut Asteroid)>, mut commands: Commands) {
    for (entity, mut asteroid) in &mut asteroids {
        asteroid.x = wrap(asteroid.x + asteroid.dx);
        asteroid.y = wrap(asteroid.y + asteroid.dy);
        asteroid.a = (asteroid.a + asteroid.da).rem_euclid(TAU);
        if asteroid.was_hit > 0 {
            asteroid.was_hit += 1;
            if asteroid.was_hit as f32 > asteroid.size {
                commands.entity(entity).despawn();
            }
        }
    }
}

fn move_blasts(mut blasts: Query<(Entity, &mut Blast)>, mut commands: Commands) {
    for (entity, mut blast) in &mut blasts {
        blast.x = wrap(blast.x + blast.dx);
        blast.y = wrap(blast.y + blast.dy);
        blast.t += 1;
        if blast.t > BLAST_STEPS {
            commands.entity(entity).despawn();
        }
    }
}

/// Blasts against asteroids, asteroids against ships: first hit wins, in `ModelId` order.
fn check_collisions(
    mut asteroids: Query<(Entity, &ModelId, &mut Asteroid)>,
    blasts: Query<(Entity, &ModelId, &Blast)>,
    mut ships: Query<(&ModelId, &mut Ship)>,
    mut commands: Commands,
    mut stats: ResMut<Stats>,
) {
    let mut blast_list: Vec<(Entity, ModelId, Blast)> = blasts.iter().map(|(e, id, b)| (e, *id, b.clone())).collect();
    blast_list.sort_by_key(|(_, id, _)| *id);
    let mut spent = vec![false; blast_list.len()];
    let mut asteroid_list: Vec<(Entity, ModelId)> = asteroids.iter().map(|(e, id, _)| (e, *id)).collect();
    asteroid_list.sort_by_key(|(_, id)| *id);
    let mut ship_order: Vec<ModelId> = ships.iter().map(|(id, _)| *id).collect();
    ship_order.sort();

    for (entity, _) in asteroid_list {
        let Ok((_, _, mut asteroid)) = asteroids.get_mut(entity) else { continue };
        if asteroid.was_hit > 0 {
            continue;
        }
        let (minx, maxx) = (asteroid.x - asteroid.size, asteroid.x + asteroid.size);
        let (miny, maxy) = (asteroid.y - asteroid.size, asteroid.y + asteroid.size);

        // Blasts.
        for (i, (blast_entity, _, blast)) in blast_list.iter().enumerate() {
            if spent[i] || blast.x <= minx || blast.x >= maxx || blast.y <= miny || blast.y >= maxy {
                continue;
            }
            spent[i] = true;
            commands.entity(*blast_entity).despawn();
            stats.asteroids_hit += 1;
            if asteroid.size > ASTEROID_MIN_SIZE {
                asteroid.size *= 0.7;
                asteroid.da *= 1.5;
                asteroid.dx = -blast.dy * 10.0 / asteroid.size;
                asteroid.dy = blast.dx * 10.0 / asteroid.size;
                commands.spawn(Asteroid { dx: -asteroid.dx, dy: -asteroid.dy, ..asteroid.clone() });
            } else {
                asteroid.was_hit = 1;
            }
            if let Some((_, mut shooter)) = ships.iter_mut().find(|(id, _)| **id == blast.ship) {
                shooter.score += 1;
            }
            break;
        }
        if asteroid.was_hit > 0 {
            continue;
        }

        // Ships.
        for ship_id in &ship_order {
            let Some((_, mut ship)) = ships.iter_mut().find(|(id, _)| *id == ship_id) else { continue };
            if ship.was_hit > 0 || ship.is_safe() {
                continue;
            }
            if ship.x + SHIP_SIZE > minx
                && ship.x - SHIP_SIZE < maxx
                && ship.y + SHIP_SIZE > miny
                && ship.y - SHIP_SIZE < maxy
            {
                ship.was_hit = 1;
                asteroid.was_hit = 1;
                stats.ships_hit += 1;
                break;
            }
        }
    }
}

fn keep_asteroids(asteroids: Query<(), With<Asteroid>>, mut commands: Commands, mut rng: ResMut<ModelRng>) {
    for _ in asteroids.iter().count()..MIN_ASTEROIDS {
        commands.spawn(new_asteroid(&mut rng));
    }
}
