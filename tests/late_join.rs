//! A late joiner restores the snapshot, catches up in bounded slices reporting
//! `Syncing { progress }`, then `Synced` — and from then on receives model → view messages.

mod common;

use bevy::prelude::*;
use bevy_synq::{CatchUpBudget, StartKind, SynqStatus};
use common::adversarial::{self, HitHappened, with_bot};
use common::{Harness, test_session};

#[derive(Resource, Default)]
struct Seen {
    statuses: Vec<SynqStatus>,
    hits: usize,
}

fn watch(mut statuses: MessageReader<SynqStatus>, mut hits: MessageReader<HitHappened>, mut seen: ResMut<Seen>) {
    seen.statuses.extend(statuses.read().cloned());
    seen.hits += hits.read().count();
}

#[test]
fn a_late_joiner_catches_up_in_slices_and_reports_progress() {
    let mut session = test_session("late");
    session.snapshot_policy.every_ms = 20_000;
    // Small slices so catching up takes several frames.
    session.catch_up = CatchUpBudget { max_messages: 5, max_time: std::time::Duration::from_secs(1) };
    let mut h = Harness::new(session, Box::new(|| Box::new(adversarial::model)));
    h.add_client(|app| {
        with_bot(1)(app);
        app.init_resource::<Seen>().add_systems(Update, watch);
    });
    h.add_client(with_bot(2));
    h.run_rounds(300, 100);
    let late = h.add_client(|app| {
        app.init_resource::<Seen>().add_systems(Update, watch);
    });
    h.run_rounds(60, 100);

    let seen = h.apps[late].world().resource::<Seen>();
    let progress: Vec<f32> = seen
        .statuses
        .iter()
        .filter_map(|s| match s {
            SynqStatus::Syncing { progress } => Some(*progress),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "caught up in too few slices: {:?}", seen.statuses);
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {progress:?}");
    assert_eq!(seen.statuses.last(), Some(&SynqStatus::Synced));
    assert!(matches!(h.client(late).started_from(), Some(StartKind::Snapshot { .. })));

    // Model → view messages reach synced views.
    assert!(h.apps[0].world().resource::<Seen>().hits > 0, "no HitHappened reached the first view");
    for app in &mut h.apps {
        if let Some(mut bot) = app.world_mut().get_resource_mut::<adversarial::Bot>() {
            bot.active = false;
        }
    }
    h.settle();
    h.assert_converged();
}
