//! Sessions at run time: one app joins a session, leaves it, and joins another, while apps in
//! both sessions watch its view come and go; the connection state moves through `SynqState`, and
//! every session's replicas (late joiners included) agree.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelWorld, SynqClient};
use common::adversarial::{self, Player, with_bot};
use common::{Harness, current_hash, test_session};

/// Every state the traveller's connection entered, in order.
#[derive(Resource, Default)]
struct Entered(Vec<SynqState>);

fn record(state: SynqState) -> impl Fn(ResMut<Entered>) {
    move |mut entered: ResMut<Entered>| entered.0.push(state)
}

/// An app that starts in no session, like a game at its main menu.
fn traveller() -> App {
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(SynqPlugin::idle(adversarial::model));
    app.init_resource::<Entered>();
    for state in [SynqState::Disconnected, SynqState::Connecting, SynqState::Syncing, SynqState::Synced] {
        app.add_systems(OnEnter(state), record(state));
    }
    app.finish();
    app.cleanup();
    app
}

fn players(app: &App) -> Vec<ViewId> {
    let Some(runtime) = app.world().resource::<ModelWorld>().runtime() else { return Vec::new() };
    let model = runtime.world();
    let mut views: Vec<ViewId> = model.try_query::<&Player>().unwrap().iter(model).map(|p| p.0).collect();
    views.sort();
    views
}

fn join(app: &mut App, session: SessionConfig, h: &Harness) {
    let target = ReflectorTarget::InProcess(h.reflector.handle());
    app.world_mut().run_system_once(move |mut s: SynqSession| s.join(session.clone(), target.clone())).unwrap();
}

/// Runs rounds of the harness and the traveller until `done`, or panics after 400 rounds.
fn run_until(h: &mut Harness, traveller: &mut App, what: &str, done: impl Fn(&Harness, &App) -> bool) {
    for _ in 0..400 {
        h.round(50);
        traveller.update();
        if done(h, traveller) {
            return;
        }
    }
    panic!("{what}: not reached; traveller at {:?}", traveller.world().resource::<SynqStatus>());
}

fn state(app: &App) -> SynqState {
    *app.world().resource::<State<SynqState>>().get()
}

#[test]
fn join_leave_and_join_another_session_with_observers_in_both() {
    let first = test_session("switch-first");
    let mut second = test_session("switch-second");
    second.password = "another password".into();
    let mut h = Harness::new(first.clone(), Box::new(|| Box::new(adversarial::model)));
    let watcher = h.add_client(with_bot(1));
    let other_watcher = h.add_client_with(second.clone(), with_bot(2));
    h.run_rounds(20, 50);

    let mut traveller = traveller();
    traveller.update();
    assert_eq!(state(&traveller), SynqState::Disconnected);
    assert!(!traveller.world().contains_resource::<SynqClient>(), "an idle plugin has no client");

    // Join the first session: the watcher sees the view arrive.
    let mut mine = first.clone();
    mine.view_id = Some(ViewId(900));
    join(&mut traveller, mine, &h);
    run_until(&mut h, &mut traveller, "synced in the first session", |_, t| state(t) == SynqState::Synced);
    run_until(&mut h, &mut traveller, "the watcher sees the traveller", |h, _| {
        players(&h.apps[watcher]).contains(&ViewId(900))
    });
    assert_eq!(players(&traveller), players(&h.apps[watcher]));
    assert_eq!(traveller.world().resource::<SynqConnection>().progress, 1.0);
    assert!(traveller.world().resource::<SynqConnection>().session.is_some());

    // Leave: the watcher sees the view go at once (no wait for a timeout), the traveller's model
    // is gone.
    traveller.world_mut().run_system_once(|mut s: SynqSession| s.leave()).unwrap();
    traveller.update();
    assert_eq!(state(&traveller), SynqState::Disconnected);
    assert!(traveller.world().resource::<ModelWorld>().runtime().is_none(), "leaving drops the model");
    assert_eq!(
        traveller.world().resource::<SynqConnection>().reason.as_deref(),
        Some("left the session"),
        "the details say why"
    );
    for _ in 0..10 {
        h.round(50);
    }
    assert!(!players(&h.apps[watcher]).contains(&ViewId(900)), "the watcher still sees the traveller");

    // Join another session (another name and password): it starts clean, from its own state.
    let mut mine = second.clone();
    mine.view_id = Some(ViewId(901));
    join(&mut traveller, mine, &h);
    run_until(&mut h, &mut traveller, "synced in the second session", |h, t| {
        state(t) == SynqState::Synced && players(&h.apps[other_watcher]).contains(&ViewId(901))
    });
    let seen = players(&traveller);
    assert!(!seen.contains(&ViewId(900)) && seen.contains(&ViewId(901)), "the second session holds {seen:?}");
    assert!(!players(&h.apps[watcher]).contains(&ViewId(901)), "the first session saw the second's view");

    // Switching without leaving first: back to the first session in one call.
    let mut mine = first.clone();
    mine.view_id = Some(ViewId(902));
    join(&mut traveller, mine, &h);
    run_until(&mut h, &mut traveller, "back in the first session", |h, t| {
        state(t) == SynqState::Synced
            && players(&h.apps[watcher]).contains(&ViewId(902))
            && !players(&h.apps[other_watcher]).contains(&ViewId(901))
    });

    // A late joiner of the first session; then everyone in it agrees with the traveller.
    let late = h.add_client(with_bot(3));
    run_until(&mut h, &mut traveller, "the late joiner synced", |h, _| {
        h.apps[late].world().resource::<SynqClient>().is_synced()
    });
    for app in h.apps.iter_mut() {
        app.world_mut().resource_mut::<adversarial::Bot>().active = false;
    }
    let traveller_time = |t: &App| t.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.now_ms());
    run_until(&mut h, &mut traveller, "the first session settled", |h, t| {
        let time = traveller_time(t);
        [watcher, late].iter().all(|&i| common::model_time(&h.apps[i]) == time)
            && h.apps[watcher].world().resource::<bevy_synq::Outbox>().is_empty()
    });
    let expected = current_hash(&mut traveller);
    for i in [watcher, late] {
        assert_eq!(current_hash(&mut h.apps[i]), expected, "replica {i} differs from the traveller");
    }
    // The late joiner is synced as soon as it executed its view-join, possibly before any snapshot
    // point of its own: the session runs on until both recorded one (the same point, the same hash).
    run_until(&mut h, &mut traveller, "the traveller and the late joiner agree at a snapshot point", |h, t| {
        let late_history = h.apps[late].world().resource::<SynqClient>().hash_history();
        t.world().resource::<SynqClient>().hash_history().iter().any(|r| late_history.contains(r))
    });

    use SynqState::*;
    assert_eq!(
        traveller.world().resource::<Entered>().0,
        [
            Disconnected,
            Connecting,
            Syncing,
            Synced,
            Disconnected,
            Connecting,
            Syncing,
            Synced,
            Connecting,
            Syncing,
            Synced
        ]
        .to_vec(),
        "the connection's states"
    );
}

#[test]
fn an_app_that_exits_leaves_its_session_at_once() {
    let session = test_session("switch-exit");
    let mut h = Harness::new(session.clone(), Box::new(|| Box::new(adversarial::model)));
    let watcher = h.add_client(with_bot(1));
    h.run_rounds(10, 50);
    let mut traveller = traveller();
    let mut mine = session;
    mine.view_id = Some(ViewId(903));
    join(&mut traveller, mine, &h);
    run_until(&mut h, &mut traveller, "the watcher sees the traveller", |h, t| {
        state(t) == SynqState::Synced && players(&h.apps[watcher]).contains(&ViewId(903))
    });

    traveller.world_mut().write_message(AppExit::Success);
    traveller.update();
    assert!(!traveller.world().contains_resource::<SynqClient>(), "the client outlived the app's last frame");
    // Well inside the reflector's 1.25 s leave delay.
    for _ in 0..10 {
        h.round(50);
    }
    assert!(!players(&h.apps[watcher]).contains(&ViewId(903)), "the exit waited for the leave delay");
}
