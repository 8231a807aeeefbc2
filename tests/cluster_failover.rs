//! Cluster mode with real processes: a three-node NATS JetStream cluster, two
//! `synq-reflector --cluster` reflectors (edges), and clients that list both. Clients of one
//! session meet on the edge that claimed it, whichever edge they reach first; when that edge
//! is killed with SIGKILL they continue on the other one, with every acknowledged event, model
//! time going on, and a late joiner agreeing. Sessions spread over the edges, and play on when a
//! NATS node is killed.

mod common;
#[path = "../crates/synq_reflector/tests/common/nats.rs"]
mod nats;

use bevy::prelude::*;
use bevy_synq::SynqClient;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::transport::udp::UdpConnector;
use common::ledger::{Departures, Ledger, ledger_len, model, play};
use common::model_time;
use common::process::{ReflectorProcess, app_with, model_resource, run_for, run_until, synced};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Short claims, so that a killed edge's sessions are taken over quickly.
const CLAIM_TTL_MS: &str = "1500";

/// Ten notes from each client (see [`play`]).
fn play_ten(a: &mut App, b: &mut App, from: u32) -> Ledger {
    play(a, b, from, TIMEOUT)
}

fn session(name: &str, view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", name, "pw");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 1_000;
    session
}

/// A client of the session `name` that tries `edges` in order.
fn client_of(name: &str, view: u64, edges: &[SocketAddr]) -> App {
    let connector = UdpConnector::new(edges[0], DEFAULT_PROTOCOL_ID)
        .with_fallbacks(edges.iter().copied())
        .with_connect_timeout(Duration::from_millis(500));
    app_with(model, session(name, view), ReflectorTarget::custom(connector))
}

/// A client of the failover test's session.
fn client(view: u64, edges: &[SocketAddr]) -> App {
    client_of("cluster-failover", view, edges)
}

fn reflector_of(app: &App) -> String {
    app.world().resource::<SynqConnection>().reflector.clone().unwrap_or_default()
}

/// A three-node NATS cluster named `name` and two reflector edges on it, with short claims.
fn cluster_with_two_edges(name: &str) -> (nats::NatsCluster, ReflectorProcess, ReflectorProcess) {
    let cluster = nats::NatsCluster::start(name, 3);
    let urls = cluster.url_list();
    let first = ReflectorProcess::start_cluster(&urls, &["--claim-ttl-ms", CLAIM_TTL_MS]);
    let second = ReflectorProcess::start_cluster(&urls, &["--claim-ttl-ms", CLAIM_TTL_MS]);
    (cluster, first, second)
}

/// Fails if any of `apps` reported a problem.
fn assert_no_problems(apps: &[&App]) {
    for app in apps {
        let problems = &app.world().resource::<common::Problems>().0;
        assert!(problems.is_empty(), "{problems:?}");
    }
}

#[test]
fn clients_meet_on_their_sessions_edge_and_continue_on_another_when_it_is_killed() {
    if !nats::nats_available("clients_meet_on_their_sessions_edge_and_continue_on_another_when_it_is_killed") {
        return;
    }
    let (_cluster, mut first, second) = cluster_with_two_edges("failover");

    // `a` reaches the first edge, which claims the session; `b` tries the second edge first and
    // is sent to the first.
    let mut a = client(1, &[first.addr, second.addr]);
    run_until(&mut [&mut a], TIMEOUT, |apps| synced(apps[0]));
    let mut b = client(2, &[second.addr, first.addr]);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    for app in [&a, &b] {
        assert!(reflector_of(app).contains(&first.addr.to_string()), "on {}", reflector_of(app));
    }
    let played = play_ten(&mut a, &mut b, 0);
    let time_before = model_time(&a);

    // SIGKILL the session's edge: the clients find it gone, reach the second edge, which takes
    // the session over once the first one's claim lapsed, and resume there.
    let killed = Instant::now();
    first.kill();
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| app.world().resource::<SynqClient>().reconnects() >= 1 && synced(app))
    });
    println!("failover: both clients synced on the other edge {:?} after the kill", killed.elapsed());
    for app in [&a, &b] {
        assert!(reflector_of(app).contains(&second.addr.to_string()), "on {}", reflector_of(app));
    }
    let after = play_ten(&mut a, &mut b, 10);
    assert_eq!(&after.0[..20], &played.0[..], "acknowledged events changed or were lost");
    assert_eq!(model_resource::<Ledger>(&b).unwrap(), after, "the replicas disagree");
    // Both clients were back within the leave delay: their views never left the model.
    assert_eq!(model_resource::<Departures>(&a).unwrap(), Departures::default(), "a view left in the failover");
    assert!(model_time(&a) >= time_before, "model time went back");
    assert!(after.0[20].2 >= played.0[19].2, "new events are stamped after the old ones");

    // A late joiner that tries the dead edge first agrees with them.
    let mut c = client(3, &[first.addr, second.addr]);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]) && ledger_len(apps[2]) == 40);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| {
        let times: Vec<u64> = apps.iter().map(|app| model_time(app)).collect();
        times.windows(2).all(|w| w[0] == w[1])
    });
    assert_eq!(model_resource::<Ledger>(&c).unwrap(), after);
    assert_no_problems(&[&a, &b, &c]);
}

#[test]
fn sessions_spread_over_the_edges_and_play_on_when_a_nats_node_is_killed() {
    if !nats::nats_available("sessions_spread_over_the_edges_and_play_on_when_a_nats_node_is_killed") {
        return;
    }
    let (mut cluster, first, second) = cluster_with_two_edges("spread");
    // Each session is served by the edge its first client reached.
    let mut a1 = client_of("spread-a", 1, &[first.addr, second.addr]);
    run_until(&mut [&mut a1], TIMEOUT, |apps| synced(apps[0]));
    let mut b1 = client_of("spread-b", 1, &[second.addr, first.addr]);
    run_until(&mut [&mut b1], TIMEOUT, |apps| synced(apps[0]));
    let mut a2 = client_of("spread-a", 2, &[second.addr, first.addr]);
    let mut b2 = client_of("spread-b", 2, &[first.addr, second.addr]);
    run_until(&mut [&mut a1, &mut a2, &mut b1, &mut b2], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    for (app, edge) in [(&a1, first.addr), (&a2, first.addr), (&b1, second.addr), (&b2, second.addr)] {
        assert!(reflector_of(app).contains(&edge.to_string()), "on {}", reflector_of(app));
    }
    let played_a = play_ten(&mut a1, &mut a2, 0);
    let played_b = play_ten(&mut b1, &mut b2, 0);

    // SIGKILL a NATS node while both sessions play: streams it led elect new leaders; sessions
    // whose appends failed meanwhile send their clients away, and they resume.
    cluster.kill(0);
    let killed = Instant::now();
    let after_a = play_ten(&mut a1, &mut a2, 10);
    let after_b = play_ten(&mut b1, &mut b2, 10);
    println!(
        "a NATS node killed: both sessions played 20 more events each within {:?} (reconnects {:?})",
        killed.elapsed(),
        [&a1, &a2, &b1, &b2].map(|app| app.world().resource::<SynqClient>().reconnects())
    );
    assert_eq!(&after_a.0[..20], &played_a.0[..], "session a lost acknowledged events");
    assert_eq!(&after_b.0[..20], &played_b.0[..], "session b lost acknowledged events");
    assert_eq!(model_resource::<Ledger>(&a2).unwrap(), after_a);
    assert_eq!(model_resource::<Ledger>(&b2).unwrap(), after_b);
    assert_no_problems(&[&a1, &a2, &b1, &b2]);
    cluster.restart(0);
}

#[test]
fn a_session_waits_out_a_lost_nats_quorum_and_continues_with_nothing_lost() {
    if !nats::nats_available("a_session_waits_out_a_lost_nats_quorum_and_continues_with_nothing_lost") {
        return;
    }
    let (mut cluster, first, second) = cluster_with_two_edges("quorum");
    let mut a = client_of("quorum", 1, &[first.addr, second.addr]);
    let mut b = client_of("quorum", 2, &[first.addr, second.addr]);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    let played = play_ten(&mut a, &mut b, 0);

    // Two of three NATS nodes down: nothing can be recorded. What the clients publish meanwhile
    // is not lost: it is stamped once the quorum is back.
    cluster.kill(1);
    cluster.kill(2);
    let lost = Instant::now();
    for i in 0..5 {
        common::ledger::note(&mut a, 100 + i);
        run_for(&mut [&mut a, &mut b], Duration::from_millis(200));
    }
    run_for(&mut [&mut a, &mut b], Duration::from_secs(3));
    assert_eq!(ledger_len(&a), 20, "an event was executed while nothing could be recorded");
    cluster.restart(1);
    cluster.restart(2);
    run_until(&mut [&mut a, &mut b], Duration::from_secs(90), |apps| {
        apps.iter().all(|app| synced(app) && ledger_len(app) == 25)
    });
    println!(
        "the quorum was lost for about 4 s: both clients synced with every event {:?} after it was lost (reconnects {:?})",
        lost.elapsed(),
        [&a, &b].map(|app| app.world().resource::<SynqClient>().reconnects())
    );
    let after = model_resource::<Ledger>(&a).unwrap();
    assert_eq!(&after.0[..20], &played.0[..], "acknowledged events changed or were lost");
    assert_eq!(model_resource::<Ledger>(&b).unwrap(), after, "the replicas disagree");
    let late: Vec<u32> = after.0[20..].iter().map(|(_, n, _)| *n).collect();
    assert_eq!(late, [100, 101, 102, 103, 104], "published during the outage: each once, in order");
}
