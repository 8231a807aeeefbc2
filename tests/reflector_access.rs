//! Access control and misbehaving peers, against a real `synq-reflector` process: a client without
//! the app's key is refused with a clear reason, and a flood of garbage datagrams leaves a running
//! session undisturbed.

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::{ModelWorld, SynqClient};
use common::process::{ReflectorProcess, data_dir, model_resource, run_until, synced, udp_app};
use common::sum::{Sum, add, model};
use std::net::UdpSocket;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);
const APP: &str = "io.bevy-synq.tests";

fn session(view: u64, key: Option<&str>) -> SessionConfig {
    let mut session = SessionConfig::new(APP, "access", "pw");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.api_key = key.map(str::to_string);
    session
}

#[test]
fn only_clients_with_the_apps_key_are_admitted() {
    let dir = data_dir("access");
    let key_option = format!("{APP}=sesame");
    let reflector = ReflectorProcess::start_with(&dir, None, &["--api-key", &key_option]);
    let mut outsider = udp_app(model, session(1, None), reflector.addr);
    let mut wrong = udp_app(model, session(2, Some("guess")), reflector.addr);
    let mut member = udp_app(model, session(3, Some("sesame")), reflector.addr);
    run_until(&mut [&mut outsider, &mut wrong, &mut member], TIMEOUT, |apps| {
        synced(apps[2])
            && apps[..2].iter().all(|app| !matches!(*app.world().resource::<SynqStatus>(), SynqStatus::Connecting))
    });
    for app in [&outsider, &wrong] {
        match app.world().resource::<SynqStatus>() {
            SynqStatus::Disconnected { reason } => assert!(reason.contains("API key"), "unclear reason: {reason}"),
            other => panic!("admitted without the key: {other:?}"),
        }
        assert!(app.world().resource::<ModelWorld>().runtime().is_none());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_flood_of_garbage_datagrams_leaves_the_session_undisturbed() {
    let dir = data_dir("garbage");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut a = udp_app(model, session(1, None), reflector.addr);
    let mut b = udp_app(model, session(2, None), reflector.addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));

    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..50u64 {
        for _ in 0..200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 1200) as usize + 1;
            let datagram: Vec<u8> = (0..len).map(|i| (state >> (i % 57)) as u8).collect();
            let _ = attacker.send_to(&datagram, reflector.addr);
        }
        add(&mut a, round);
        add(&mut b, 1000 + round);
        for app in [&mut a, &mut b] {
            app.update();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| {
            model_resource::<Sum>(app).is_some_and(|s| s.0 == (0..50).sum::<u64>() + (1000..1050).sum::<u64>())
        })
    });
    assert_eq!(model_resource::<Sum>(&a), model_resource::<Sum>(&b));
    for app in [&a, &b] {
        let client = app.world().resource::<SynqClient>();
        assert_eq!(client.reconnects(), 0, "the flood disturbed the connection");
        assert!(client.is_synced());
    }
    let _ = std::fs::remove_dir_all(dir);
}
