//! Session claims in JetStream (`JetStreamStorage` with an advertised address) against a real
//! three-node `nats-server` cluster: one reflector serves a session and the others are sent to
//! it; a released claim is taken at once, a lapsed one after its time to live, and the reflector
//! whose claim was taken over is told at its next renewal.
#![cfg(feature = "cluster")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use synq_protocol::ids::SessionId;
use synq_reflector::storage::{Claim, JetStreamOptions, JetStreamStorage, Storage};

mod common;
use common::nats::{NatsCluster, nats_available};

const S: SessionId = SessionId([21; 32]);
const T: SessionId = SessionId([22; 32]);
const TTL: Duration = Duration::from_millis(1500);

fn edge(cluster: &NatsCluster, advertise: &str) -> (JetStreamStorage, SocketAddr) {
    let advertise: SocketAddr = advertise.parse().unwrap();
    let options = JetStreamOptions { advertise: Some(advertise), claim_ttl: TTL, ..Default::default() };
    let storage = JetStreamStorage::connect(&cluster.urls(), options)
        .unwrap_or_else(|e| panic!("connecting to the NATS cluster: {e}; node0 log: {}", cluster.log(0)));
    (storage, advertise)
}

/// Renews `storage`'s claims until `done` holds for what it reports lost; panics after 20 s.
fn renew_until(storage: &mut JetStreamStorage, what: &str, mut done: impl FnMut(&[SessionId]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if done(&storage.renew_claims()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not reached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_reflector_serves_a_session_and_the_others_are_sent_to_it() {
    if !nats_available("one_reflector_serves_a_session_and_the_others_are_sent_to_it") {
        return;
    }
    let cluster = NatsCluster::start("claims", 3);
    let (mut a, a_addr) = edge(&cluster, "127.0.0.1:7001");
    let (mut b, b_addr) = edge(&cluster, "127.0.0.1:7002");

    assert_eq!(a.claim(&S).unwrap(), Claim::Owned);
    assert_eq!(b.claim(&S).unwrap(), Claim::ServedBy(a_addr), "the second reflector is sent to the first");
    assert_eq!(a.claim(&S).unwrap(), Claim::Owned, "a claim held stays held");
    // Renewed claims hold well past their time to live.
    let held = Instant::now();
    while held.elapsed() < TTL * 2 {
        assert!(a.renew_claims().is_empty(), "a renewed claim was lost");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.claim(&S).unwrap(), Claim::ServedBy(a_addr));

    // Released (the session was unloaded): the other takes it at once.
    a.unload_session(&S);
    assert_eq!(b.claim(&S).unwrap(), Claim::Owned);
    assert_eq!(a.claim(&S).unwrap(), Claim::ServedBy(b_addr));

    // A process that comes back at its own address takes over its earlier incarnation's claim.
    drop(b);
    let (mut b_again, _) = edge(&cluster, "127.0.0.1:7002");
    assert_eq!(b_again.claim(&S).unwrap(), Claim::Owned);
    assert!(b_again.renew_claims().is_empty());
}

#[test]
fn a_lapsed_claim_is_taken_over_and_its_holder_told_at_its_next_renewal() {
    if !nats_available("a_lapsed_claim_is_taken_over_and_its_holder_told_at_its_next_renewal") {
        return;
    }
    let cluster = NatsCluster::start("claims-lapse", 3);
    let (mut a, a_addr) = edge(&cluster, "127.0.0.1:7011");
    let (mut b, b_addr) = edge(&cluster, "127.0.0.1:7012");
    assert_eq!(a.claim(&T).unwrap(), Claim::Owned);
    assert_eq!(b.claim(&T).unwrap(), Claim::ServedBy(a_addr));

    // `a` stalls (it does not renew): once its claim lapsed, `b` takes the session.
    let stalled = Instant::now();
    let deadline = stalled + Duration::from_secs(20);
    while b.claim(&T).unwrap() != Claim::Owned {
        assert!(Instant::now() < deadline, "the lapsed claim was never taken over");
        std::thread::sleep(Duration::from_millis(50));
    }
    let taken_after = stalled.elapsed();
    assert!(taken_after >= TTL / 2, "taken over after {taken_after:?}, before the claim could lapse");
    println!("a claim of {TTL:?} not renewed was taken over after {taken_after:?}");

    // `a` wakes up: its next renewal reports the session lost, and it is sent to `b`.
    renew_until(&mut a, "a learns it lost the session", |lost| lost.contains(&T));
    assert_eq!(a.claim(&T).unwrap(), Claim::ServedBy(b_addr));
    assert!(b.renew_claims().is_empty(), "the new holder keeps it");
}
