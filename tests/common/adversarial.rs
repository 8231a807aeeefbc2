//! An adversarial model: everything that breaks naive replication at once — spawns and despawns,
//! components inserted and removed (archetype moves), references between entities, first-hit-wins
//! logic that depends on query order, future timers and RNG draws — plus a bot view that drives it.

use bevy::prelude::*;
use bevy_synq::math;
use bevy_synq::prelude::*;
use serde::{Deserialize, Serialize};

pub const WORLD: f32 = 1000.0;

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Body {
    pub x: f32,
    pub y: f32,
    pub vx: f32,
    pub vy: f32,
}

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Health(pub i32);

/// Inserted and removed over and over: moves entities between archetypes.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Charged(pub u32);

/// An entity reference, by stable id.
#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Chasing(pub ModelId);

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Player(pub ViewId);

#[derive(Component, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Projectile {
    pub owner: ModelId,
}

#[derive(Resource, Serialize, Deserialize, Default, Debug, Clone)]
pub struct Stats {
    pub hits: u64,
    pub spawned: u64,
    pub expired: u64,
    pub pokes: u64,
    /// Order-dependent: the ids in the order the hits happened.
    pub hit_log: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub enum Input {
    Spawn { x: f32, y: f32 },
    Shoot { angle: f32 },
    Poke(u64),
    Burst(u8),
}

#[derive(Event, Serialize, Deserialize, Clone, Copy, Debug)]
pub struct Expire(pub ModelId);

/// Sent to the view when a hit happens.
#[derive(Message, Clone, Debug)]
pub struct HitHappened(pub u64);

pub fn model(model: &mut ModelApp) {
    model
        .register_component::<Body>()
        .register_component::<Health>()
        .register_component::<Charged>()
        .register_component::<Chasing>()
        .register_component::<Player>()
        .register_component::<Projectile>()
        .init_resource::<Stats>()
        .add_view_event::<Input>()
        .add_timer_event::<Expire>()
        .add_view_message::<HitHappened>()
        .add_systems(ModelInit, init)
        .add_systems(ModelUpdate, (movement, collide, toggle_charge, chase, spawn_random).chain())
        .add_observer(on_join)
        .add_observer(on_exit)
        .add_observer(on_input)
        .add_observer(on_expire);
}

fn init(mut commands: Commands, mut rng: ResMut<ModelRng>) {
    for _ in 0..20 {
        let body = Body {
            x: rng.range_f32(0.0, WORLD),
            y: rng.range_f32(0.0, WORLD),
            vx: rng.range_f32(-3.0, 3.0),
            vy: rng.range_f32(-3.0, 3.0),
        };
        commands.spawn((body, Health(3)));
    }
}

fn on_join(joined: On<ViewJoined>, mut commands: Commands) {
    commands.spawn((Player(joined.view), Body { x: 500.0, y: 500.0, vx: 0.0, vy: 0.0 }, Health(10)));
}

fn on_exit(exited: On<ViewExited>, players: Query<(Entity, &Player)>, mut commands: Commands) {
    for (entity, player) in &players {
        if player.0 == exited.view {
            commands.entity(entity).despawn();
        }
    }
}

#[allow(clippy::too_many_arguments)] // a handler that touches everything, on purpose
fn on_input(
    input: On<FromView<Input>>,
    players: Query<(&Player, &ModelId, &Body)>,
    mut commands: Commands,
    mut rng: ResMut<ModelRng>,
    mut timers: ModelTimers,
    mut stats: ResMut<Stats>,
    entities: Res<ModelEntities>,
    mut healths: Query<&mut Health>,
) {
    let Some((_, owner, body)) = players.iter().find(|(p, _, _)| p.0 == input.view) else { return };
    match input.event {
        Input::Spawn { x, y } => {
            let id = commands
                .spawn((
                    Body { x: x.rem_euclid(WORLD), y: y.rem_euclid(WORLD), vx: rng.range_f32(-2.0, 2.0), vy: 1.0 },
                    Health(2),
                ))
                .id();
            let _ = id;
            stats.spawned += 1;
        }
        Input::Shoot { angle } => {
            let (dx, dy) = math::direction(angle);
            let allocated = commands
                .spawn((Body { x: body.x, y: body.y, vx: dx * 12.0, vy: dy * 12.0 }, Projectile { owner: *owner }))
                .id();
            let _ = allocated;
            // The id the projectile will get is the allocator's next one: schedule its expiry by
            // a random lifetime.
            let lifetime = rng.range_u64(300, 1500);
            timers.after(lifetime, Expire(ModelId::from_raw(0)));
        }
        Input::Poke(raw) => {
            stats.pokes += 1;
            if let Some(entity) = entities.get(ModelId::from_raw(raw))
                && let Ok(mut health) = healths.get_mut(entity)
            {
                health.0 -= 1;
            }
        }
        Input::Burst(n) => {
            for _ in 0..n.min(8) {
                commands.spawn((
                    Body {
                        x: rng.range_f32(0.0, WORLD),
                        y: rng.range_f32(0.0, WORLD),
                        vx: rng.range_f32(-5.0, 5.0),
                        vy: rng.range_f32(-5.0, 5.0),
                    },
                    Health(1),
                    Charged(rng.u32() % 7),
                ));
            }
        }
    }
}

fn on_expire(
    expire: On<Expire>,
    projectiles: Query<(Entity, &ModelId), With<Projectile>>,
    mut commands: Commands,
    mut stats: ResMut<Stats>,
) {
    // Expire the oldest projectile (lowest id): ordered by stable id, not by query order.
    let _ = expire.0;
    if let Some((entity, _)) = projectiles.iter().min_by_key(|(_, id)| **id) {
        commands.entity(entity).despawn();
        stats.expired += 1;
    }
}

fn movement(mut bodies: Query<&mut Body>) {
    for mut body in &mut bodies {
        body.x = (body.x + body.vx).rem_euclid(WORLD);
        body.y = (body.y + body.vy).rem_euclid(WORLD);
    }
}

/// First hit wins, in query iteration order: the result depends on that order.
fn collide(
    projectiles: Query<(Entity, &Body, &Projectile)>,
    mut targets: Query<(Entity, &ModelId, &Body, &mut Health), Without<Projectile>>,
    mut commands: Commands,
    mut stats: ResMut<Stats>,
    mut to_view: ToView<HitHappened>,
) {
    let mut spent = Vec::new();
    for (target, id, body, mut health) in &mut targets {
        for (projectile, shot, p) in &projectiles {
            if spent.contains(&projectile) || p.owner == *id {
                continue;
            }
            if (shot.x - body.x).abs() < 40.0 && (shot.y - body.y).abs() < 40.0 {
                spent.push(projectile);
                health.0 -= 1;
                stats.hits += 1;
                stats.hit_log.push(id.get());
                to_view.send(HitHappened(id.get()));
                commands.entity(projectile).despawn();
                if health.0 <= 0 {
                    commands.entity(target).despawn();
                }
                break;
            }
        }
    }
}

fn toggle_charge(
    mut commands: Commands,
    mut charged: Query<(Entity, &mut Charged)>,
    plain: Query<(Entity, &Health), Without<Charged>>,
    time: Res<ModelTime>,
) {
    for (entity, mut charge) in &mut charged {
        charge.0 += 1;
        if charge.0 > 9 {
            commands.entity(entity).remove::<Charged>();
        }
    }
    if time.steps().is_multiple_of(7) {
        for (entity, health) in &plain {
            if health.0 % 2 == 0 {
                commands.entity(entity).insert(Charged(0));
            }
        }
    }
}

fn chase(
    mut commands: Commands,
    chasers: Query<(Entity, &Chasing)>,
    bodies: Query<(&ModelId, &Body), Without<Projectile>>,
    entities: Res<ModelEntities>,
    mut rng: ResMut<ModelRng>,
) {
    // Drop references to entities that are gone; pick new targets at random.
    for (entity, chasing) in &chasers {
        if entities.get(chasing.0).is_none() {
            commands.entity(entity).remove::<Chasing>();
        }
    }
    if rng.chance(0.2) {
        let candidates: Vec<ModelId> = bodies.iter().map(|(id, _)| *id).collect();
        if candidates.len() >= 2 {
            let hunter = candidates[rng.index(candidates.len())];
            let prey = candidates[rng.index(candidates.len())];
            if hunter != prey
                && let Some(entity) = entities.get(hunter)
            {
                commands.entity(entity).insert(Chasing(prey));
            }
        }
    }
}

fn spawn_random(
    mut commands: Commands,
    mut rng: ResMut<ModelRng>,
    bodies: Query<(), With<Health>>,
    mut stats: ResMut<Stats>,
) {
    if bodies.iter().count() < 15 || rng.chance(0.05) {
        commands.spawn((
            Body { x: rng.range_f32(0.0, WORLD), y: 0.0, vx: rng.range_f32(-1.0, 1.0), vy: rng.range_f32(1.0, 4.0) },
            Health(1 + (rng.u32() % 3) as i32),
        ));
        stats.spawned += 1;
    }
}

/// A view-side bot: publishes seeded-random input. Its randomness is the view's own business:
/// the model only ever sees the stamped events.
#[derive(Resource)]
pub struct Bot {
    pub state: u64,
    pub active: bool,
    pub rate: u64,
}

impl Bot {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1,
            active: true,
            rate: 3,
        }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

pub fn bot(mut bot: ResMut<Bot>, mut publish: Publish<Input>, mut ids: ModelQuery<&ModelId>) {
    if !bot.active {
        return;
    }
    let roll = bot.next() % 10;
    if roll >= bot.rate {
        return;
    }
    let input = match bot.next() % 4 {
        0 => Input::Spawn { x: (bot.next() % 1000) as f32, y: (bot.next() % 1000) as f32 },
        1 => Input::Shoot { angle: (bot.next() % 628) as f32 / 100.0 },
        2 => {
            let all: Vec<u64> = ids.iter().map(|id| id.get()).collect();
            if all.is_empty() {
                return;
            }
            let pick = all[(bot.next() % all.len() as u64) as usize];
            Input::Poke(pick)
        }
        _ => Input::Burst((bot.next() % 5) as u8),
    };
    publish.send(input);
}

/// Adds the bot to a client app.
pub fn with_bot(seed: u64) -> impl FnOnce(&mut App) {
    move |app: &mut App| {
        app.insert_resource(Bot::new(seed)).add_systems(Update, bot);
    }
}
