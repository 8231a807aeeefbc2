//! Lints for model code: the traps that do not make replicas diverge but silently lose state or
//! fail deep inside Bevy, reported with the rule and the fix.
//!
//! * When the model is built ([`check_build`], at the end of `ModelApp::build`, so first when
//!   `SynqPlugin` is added to the app): every model system and observer's resource accesses are
//!   checked against the registered resources, every model schedule is built with Bevy's
//!   ambiguity detection at error level, and the `Local`s found at registration are warned about.
//!   Errors are programming errors found before any session starts: they panic with one message
//!   naming each system, the resource or the two systems, and the fix.
//! * At a snapshot point ([`unregistered_resources`]): resources in the model world that are not
//!   registered and were inserted after the model was built, or changed since — state that the
//!   snapshot point loses.
//! * While the model runs ([`model_error_handler`], the model world's `FallbackErrorHandler`): a
//!   system parameter that fails validation panics with a message that says what the model world
//!   holds, instead of Bevy's generic one.

use bevy::ecs::component::ComponentId;
use bevy::ecs::error::{BevyError, ErrorContext};
use bevy::ecs::query::{ComponentAccessKind, FilteredAccessSet};
use bevy::ecs::resource::IS_RESOURCE;
use bevy::ecs::schedule::{
    InternedScheduleLabel, LogLevel, ScheduleBuildError, ScheduleBuildSettings, ScheduleBuildWarning, ScheduleLabel,
};
use bevy::ecs::system::SystemParamValidationError;
use bevy::prelude::*;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::registry::ModelRegistry;
use super::time::{ModelInit, ModelUpdate};
use super::timers::TimerIndex;

/// What `ModelApp` noted while the plugin registered its systems and observers.
#[derive(Default)]
pub(crate) struct Lints {
    /// Warnings about `Local` parameters, one per system or observer.
    locals: Vec<String>,
    /// The resource accesses of the observers added through `ModelApp::add_observer`.
    observers: Vec<(String, FilteredAccessSet)>,
    /// `ModelApp::allow_ambiguities` was called.
    pub allow_ambiguities: bool,
}

/// The path of Bevy's `Local` as `type_name` prints it.
const LOCAL: &str = "bevy_ecs::system::system_param::Local<";

impl Lints {
    /// Notes the `Local` parameters visible in the marker type of systems given to
    /// `ModelApp::add_systems` (`names`: the systems that call added, in order).
    ///
    /// Bevy keeps no record of a system's parameter types, but a plain function or closure system
    /// (alone or in a tuple) is added with a marker type that spells its signature. Systems that
    /// were configured before (`.chain()`, `.after()`, `.run_if()`) arrive as `ScheduleConfigs`,
    /// whose marker is `()`: their `Local`s cannot be seen here.
    pub fn note_locals(&mut self, kind: &str, marker: &str, names: &[String]) {
        let signatures = signatures(marker);
        if !signatures.iter().any(|s| s.contains(LOCAL)) {
            return;
        }
        for (i, signature) in signatures.iter().enumerate() {
            let Some(local) = local_param(signature) else { continue };
            let who = if signatures.len() == names.len() {
                format!("model {kind} `{}`", system_name(&names[i]))
            } else if names.len() == 1 {
                format!("model {kind} `{}`", system_name(&names[0]))
            } else {
                format!("a model {kind} `{}`", short(signature))
            };
            self.locals.push(format!(
                "bevy_synq: {who} keeps state in `{local}`. A `Local` is not part of the snapshot: at every \
                 snapshot point every replica rebuilds its model world, and the `Local` starts again from its \
                 default value (on every replica alike, so nothing diverges, but its state is lost). Keep the \
                 state in a registered resource (`ModelApp::init_resource`) or component \
                 (`ModelApp::register_component`) instead."
            ));
        }
    }

    /// Records the resource accesses of an observer added through `ModelApp::add_observer`.
    pub fn note_observer(&mut self, name: String, access: FilteredAccessSet) {
        self.observers.push((name, access));
    }
}

/// The top-level `fn(…)` signatures in a marker type name, in order.
fn signatures(marker: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = 0;
    while let Some(at) = marker[rest..].find("fn(").map(|i| i + rest) {
        let mut depth = 0usize;
        let mut end = marker.len();
        for (i, c) in marker[at + 2..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + 2 + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push(&marker[at..end]);
        rest = end;
    }
    found
}

/// The first `Local<…>` parameter of a signature, shortened.
fn local_param(signature: &str) -> Option<String> {
    let at = signature.find(LOCAL)?;
    let mut depth = 0usize;
    for (i, c) in signature[at..].char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth -= 1;
                if depth == 0 {
                    return Some(short(&signature[at..at + i + 1]));
                }
            }
            _ => {}
        }
    }
    None
}

/// A system's name for a message: short, unless it is a closure (then its path says where).
fn system_name(name: &str) -> String {
    if name.contains("{{closure}}") { name.to_string() } else { short(name) }
}

/// A type name without its module paths and lifetimes: `alloc::vec::Vec<my::Thing>` →
/// `Vec<Thing>`, `Local<'_, u32>` → `Local<u32>`.
pub(crate) fn short(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut segment_start = 0;
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' {
            i += 1;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            if bytes[i..].starts_with(b", ") {
                i += 2;
            }
            continue;
        }
        if c == b':' && bytes.get(i + 1) == Some(&b':') {
            out.truncate(segment_start);
            i += 2;
            continue;
        }
        out.push(c as char);
        if !(c.is_ascii_alphanumeric() || c == b'_') {
            segment_start = out.len();
        }
        i += 1;
    }
    out
}

/// Whether a resource is bevy_synq's own or Bevy's bookkeeping (not model state the app owns).
/// Bevy's message buffers are not: messages between model systems are not in the snapshot.
/// (Types in bevy_synq's own `tests` modules stand for an app's.)
fn is_internal(name: &str) -> bool {
    (name.starts_with("bevy_synq::") && !name.contains("::tests::"))
        || (name.starts_with("bevy_ecs::") && !name.starts_with("bevy_ecs::message::"))
}

fn is_registered(registry: &ModelRegistry, name: &str) -> bool {
    registry.resources.iter().any(|r| r.name == name)
}

/// The resources a system reads (`false`) or writes (`true`).
fn resource_accesses(access: &FilteredAccessSet) -> Vec<(ComponentId, bool)> {
    let mut found = Vec::new();
    for filtered in access.filtered_accesses() {
        if !filtered.with_filters().any(|id| id == IS_RESOURCE) {
            continue;
        }
        // Exclusive systems (`&mut World`) access everything: nothing to name.
        let Ok(kinds) = filtered.access().try_iter_access() else { continue };
        for kind in kinds {
            match kind {
                ComponentAccessKind::Shared(id) => found.push((id, false)),
                ComponentAccessKind::Exclusive(id) => found.push((id, true)),
                ComponentAccessKind::Archetypal(_) => {}
            }
        }
    }
    found
}

/// Warns once per process with each message (the model is built again at every snapshot point).
fn warn_once(message: &str) {
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = WARNED.lock().map(|mut warned| warned.insert(message.to_string())).unwrap_or(true);
    if first {
        tracing::warn!("{message}");
    }
}

/// Checks a model world that `ModelPlugin::build` just filled in, and builds its schedules.
///
/// Panics with every error found (systems that read resources the model world never has,
/// ambiguous systems); warns once about `Local`s and about unregistered resources that model
/// systems change.
pub(crate) fn check_build(world: &mut World, registry: &ModelRegistry, lints: &Lints) {
    let mut errors: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = lints.locals.clone();
    let mut accesses: Vec<(String, String, FilteredAccessSet)> = Vec::new();

    // The model schedules, in a fixed order: ModelInit, ModelUpdate, then any other by name.
    let mut labels: Vec<InternedScheduleLabel> = vec![ModelInit.intern(), ModelUpdate.intern()];
    let mut others: Vec<(String, InternedScheduleLabel)> = world
        .resource::<Schedules>()
        .iter()
        .map(|(_, schedule)| schedule.label())
        .filter(|label| !labels.contains(label))
        .map(|label| (format!("{label:?}"), label))
        .collect();
    others.sort_by(|a, b| a.0.cmp(&b.0));
    labels.extend(others.into_iter().map(|(_, label)| label));

    let ambiguity_detection = if lints.allow_ambiguities { LogLevel::Ignore } else { LogLevel::Error };
    for label in labels {
        let Some(mut schedule) = world.resource_mut::<Schedules>().remove(label) else { continue };
        schedule.set_build_settings(ScheduleBuildSettings { ambiguity_detection, ..schedule.get_build_settings() });
        // Initialising a system twice is allowed (the schedule does it again below): the second
        // time it keeps its state and reports the same access.
        let graph = schedule.graph_mut();
        let keys: Vec<_> = graph.systems.iter().map(|(key, _, _)| key).collect();
        for key in keys {
            if let Some(system) = graph.systems.get_mut(key) {
                let access = system.initialize(world);
                accesses.push(("system".into(), system.name().to_string(), access));
            }
            for condition in graph.systems.get_conditions_mut(key).into_iter().flatten() {
                let access = condition.initialize(world);
                accesses.push(("run condition".into(), condition.name().to_string(), access));
            }
        }
        if let Err(error) = schedule.initialize(world) {
            let ambiguous = matches!(error, ScheduleBuildError::Elevated(ScheduleBuildWarning::Ambiguity(_)));
            let described = error.to_string(schedule.graph(), world);
            errors.push(if ambiguous {
                format!(
                    "bevy_synq: in the model schedule {label:?}, {}\nModel systems whose data access conflicts \
                     must run in a declared order: order them with `.chain()`, `.before()` or `.after()`. If \
                     their order really does not matter, say so with `.ambiguous_with(other)`, or turn this \
                     check off for the whole model with `ModelApp::allow_ambiguities()`.",
                    described.trim_end()
                )
            } else {
                format!("bevy_synq: the model schedule {label:?} does not build: {}", described.trim_end())
            });
        }
        world.resource_mut::<Schedules>().insert(schedule);
    }
    for (name, access) in &lints.observers {
        accesses.push(("observer".into(), name.clone(), access.clone()));
    }

    let mut reported = BTreeSet::new();
    for (kind, system, access) in &accesses {
        for (id, write) in resource_accesses(access) {
            let Some(name) = world.components().get_name(id).map(|n| n.to_string()) else { continue };
            if is_internal(&name) || is_registered(registry, &name) {
                continue;
            }
            let present = world.get_resource_by_id(id).is_some();
            if !present && reported.insert((system.clone(), name.clone())) {
                errors.push(missing_resource(kind, system, &name));
            } else if present && write && reported.insert((String::new(), name.clone())) {
                warnings.push(format!(
                    "bevy_synq: the model {kind} `{}` changes the resource `{name}`, which is not registered: \
                     it is not part of the snapshot, so at every snapshot point it is reset to the value \
                     `ModelPlugin::build` gave it. Register it with `ModelApp::insert_resource` or \
                     `ModelApp::init_resource` instead of inserting it into the world directly.",
                    system_name(system)
                ));
            }
        }
    }

    // A system's first run takes the world's current change tick: move past the tick `build`
    // inserted its resources at, so `unregistered_resources` can tell them from later changes.
    world.increment_change_tick();

    for warning in &warnings {
        warn_once(warning);
    }
    if !errors.is_empty() {
        panic!("{}", errors.join("\n\n"));
    }
}

/// The error for a system that reads a resource the model world does not have after build and
/// that is not registered.
fn missing_resource(kind: &str, system: &str, name: &str) -> String {
    let system = system_name(system);
    let resource = short(name);
    if name.starts_with("bevy_time::") {
        return format!(
            "bevy_synq: the model {kind} `{system}` reads `{resource}`, which the model world does not have: \
             the model never sees the app's clock. Read model time with `Res<ModelTime>` (`now_ms()`: \
             milliseconds of reflector time, the same on every replica; `step_ms()`: the fixed step)."
        );
    }
    let mut message = format!(
        "bevy_synq: the model {kind} `{system}` uses the resource `{resource}` ({name}), which is not a \
         registered model resource: it is not in the model world, or it vanishes at the first snapshot point."
    );
    let _ = write!(
        message,
        " If it is model state, register it: `ModelApp::init_resource::<{resource}>()` or \
         `ModelApp::insert_resource(value)`, or `ModelApp::register_resource::<{resource}>()` and insert it \
         in `ModelInit`. If it is an app resource, the model cannot read it: views send the model what it \
         needs as events (`ModelApp::add_view_event`)."
    );
    message
}

/// Unregistered resources in the model world whose state a snapshot point loses: those inserted
/// after `ModelPlugin::build` (they vanish) and those changed since (they are reset). Resources
/// that `build` inserted and nothing changed are constants that every rebuild restores: not
/// reported. The same on every replica (change ticks follow the same operations everywhere).
///
/// Call it before the snapshot point encodes the world (see `ModelProblem::UnregisteredResources`).
pub(crate) fn unregistered_resources(world: &World, registry: &ModelRegistry) -> Vec<String> {
    // `TimerIndex` is inserted at the end of `ModelApp::build`: its tick is the build's.
    let built = world.component_id::<TimerIndex>().and_then(|id| world.get_resource_change_ticks_by_id(id));
    let now = world.read_change_tick();
    let mut found = BTreeSet::new();
    for (info, _) in world.iter_resources() {
        let name = info.name().to_string();
        if is_internal(&name) || is_registered(registry, &name) {
            continue;
        }
        let Some(ticks) = world.get_resource_change_ticks_by_id(info.id()) else { continue };
        let inserted_later = built.is_none_or(|built| ticks.added.is_newer_than(built.added, now));
        let changed = ticks.changed.is_newer_than(ticks.added, now);
        if inserted_later || changed {
            found.insert(name);
        }
    }
    found.into_iter().collect()
}

/// The model world's `FallbackErrorHandler`: a parameter that fails validation panics with what
/// the model world holds and what to do; other errors go to Bevy's default handler.
pub(crate) fn model_error_handler(error: BevyError, context: ErrorContext) {
    if let Some(invalid) = error.downcast_ref::<SystemParamValidationError>() {
        panic!(
            "bevy_synq: the model {} `{}` cannot run: parameter `{}{}`: {}. The model world holds only \
             bevy_synq's resources (ModelTime, ModelRng, ModelViews, ModelEntities…) and the resources the \
             model registered and inserted (`ModelApp::init_resource`, `insert_resource`, or \
             `register_resource` and an insert in `ModelInit`); app resources such as `Time` are not there \
             (read model time with `Res<ModelTime>`).",
            context.kind(),
            system_name(&context.name().to_string()),
            short(&invalid.param.to_string()),
            invalid.field,
            invalid.message
        );
    }
    bevy::ecs::error::match_severity(error, context);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(short("alloc::vec::Vec<my::Thing>"), "Vec<Thing>");
        assert_eq!(short("bevy_ecs::system::system_param::Local<u64>"), "Local<u64>");
        assert_eq!(short("fn(a::B, c::D<e::F>)"), "fn(B, D<F>)");
        assert_eq!(short("a::Local<'_, u32>"), "Local<u32>");
        assert_eq!(short("a::Query<'_, 'static, &a::B>"), "Query<&B>");
    }

    #[test]
    fn finds_local_parameters_in_markers() {
        let marker = "(bevy_ecs::system::function_system::IsFunctionSystem, \
                      fn(bevy_ecs::system::system_param::Local<u64>, bevy_ecs::system::query::Query<&mut x::C>))";
        let found = signatures(marker);
        assert_eq!(found.len(), 1);
        assert_eq!(local_param(found[0]).as_deref(), Some("Local<u64>"));
        let nested = "(M, (fn(a::A<fn(u8)>), fn(bevy_ecs::system::system_param::Local<(u8, u16)>)))";
        let found = signatures(nested);
        assert_eq!(found, vec!["fn(a::A<fn(u8)>)", "fn(bevy_ecs::system::system_param::Local<(u8, u16)>)"]);
        assert_eq!(local_param(found[1]).as_deref(), Some("Local<(u8, u16)>"));
    }

    #[test]
    fn finds_the_resources_a_snapshot_point_loses() {
        use crate::model::app::{ModelApp, WorldSettings};
        #[derive(Resource, Default)]
        struct Constant;
        #[derive(Resource, Default)]
        struct Bumped(u32);
        #[derive(Resource)]
        struct Later;
        #[derive(Resource, Default, serde::Serialize, serde::Deserialize)]
        struct Registered(u32);
        fn model(model: &mut ModelApp) {
            model.init_resource::<Registered>().add_systems(
                ModelUpdate,
                (
                    |mut bumped: ResMut<Bumped>, mut registered: ResMut<Registered>| {
                        bumped.0 += 1;
                        registered.0 += 1;
                    },
                    |mut commands: Commands| commands.insert_resource(Later),
                )
                    .chain(),
            );
            model.world_mut().init_resource::<Constant>();
            model.world_mut().init_resource::<Bumped>();
        }
        let mut app = ModelApp::build(WorldSettings { step_ms: 50, seed: [0; 32] }, &model);
        assert!(unregistered_resources(&app.world, &app.registry).is_empty(), "nothing is lost before the model runs");
        app.world.run_schedule(ModelUpdate);
        let found = unregistered_resources(&app.world, &app.registry);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].ends_with("::Bumped") && found[1].ends_with("::Later"), "{found:?}");
    }

    #[test]
    fn real_markers_spell_locals() {
        fn marker<M>(_: impl IntoScheduleConfigs<bevy::ecs::system::ScheduleSystem, M>) -> &'static str {
            std::any::type_name::<M>()
        }
        fn counting(mut n: Local<u32>) {
            *n += 1;
        }
        let mut lints = Lints::default();
        lints.note_locals("system", marker(counting), &["counting".into()]);
        lints.note_locals("system", marker((|| {}, |_: Local<bool>| {})), &["a".into(), "b".into()]);
        assert_eq!(lints.locals.len(), 2, "{:?}", lints.locals);
        assert!(lints.locals[0].contains("`counting` keeps state in `Local<u32>`"), "{}", lints.locals[0]);
        assert!(lints.locals[1].contains("`b` keeps state in `Local<bool>`"), "{}", lints.locals[1]);
    }
}
