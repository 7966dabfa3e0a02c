//! The loopback ports of the harness (tests/common/ports.rs): never one
//! twice, none from the kernel's ephemeral range, each held until its
//! server starts, and a start that finds a port taken meanwhile moves to
//! new ones, on both servers and for redeliver's metrics listener.

#[macro_use]
mod common;

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::TcpListener;
use std::rc::Rc;

use common::fake::FakeServer;
use common::ports::{self, listener_of};
use common::*;

/// The kernel's ephemeral range, which bind(0) and connect() draw from.
fn ephemeral() -> std::ops::RangeInclusive<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut n = text.split_whitespace().map(|n| n.parse().unwrap());
    n.next().unwrap()..=n.next().unwrap()
}

#[test]
fn no_port_is_handed_out_twice_nor_from_the_ephemeral_range() {
    let ports: Vec<u16> = (0..2000).map(|_| ports::reserve(1).release()[0]).collect();
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    let ephemeral = ports.iter().filter(|p| ephemeral().contains(p)).count();
    assert_eq!(
        (distinct.len(), ephemeral),
        (ports.len(), 0),
        "distinct ports, ports from the ephemeral range"
    );
}

#[test]
fn reserved_ports_are_held_until_released() {
    let reserved = ports::reserve(2);
    let ports = reserved.ports();
    assert_ne!(ports[0], ports[1]);
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    for &p in &ports {
        assert_eq!(listener_of(p, std::process::id()), Some(true), "{p}");
        assert_eq!(listener_of(p, other.id()), Some(false), "{p}");
        // Nobody else gets it meanwhile.
        assert!(TcpListener::bind(("127.0.0.1", p)).is_err(), "{p}");
    }
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(reserved.release(), ports);
    for p in ports {
        assert_eq!(listener_of(p, std::process::id()), None, "{p}");
    }
}

/// On the next release of ports on this thread, bind the first of them
/// here, as another process could before its server does; the listener
/// it took.
fn take_the_first_port_meanwhile() -> Rc<RefCell<Option<TcpListener>>> {
    let taken: Rc<RefCell<Option<TcpListener>>> = Rc::default();
    let thief = taken.clone();
    ports::meanwhile(move |p| {
        *thief.borrow_mut() = Some(TcpListener::bind(("127.0.0.1", p[0])).unwrap());
    });
    taken
}

fn port_of(taken: &RefCell<Option<TcpListener>>) -> u16 {
    let taken = taken.borrow();
    let l = taken.as_ref().expect("a port was taken");
    l.local_addr().unwrap().port()
}

/// The first c2s port is taken between its release and the server's
/// start: the server comes up on two others, listens on them itself, and
/// serves a login.
async fn a_server_start_moves_off_a_port_taken_meanwhile(kind: Kind) {
    let taken = take_the_first_port_meanwhile();
    let server = Server::start(kind, ServerOpts::default());
    let stolen = port_of(&taken);
    let ports = [server.c2s_port, server.component_port];
    assert!(!ports.contains(&stolen), "{ports:?} {stolen}");
    for p in ports {
        assert_eq!(listener_of(p, server.pid().unwrap()), Some(true), "{p}");
    }
    Client::connect(server.c2s_port, "bob", ClientOpts::default())
        .await
        .close()
        .await;
}

on_both_servers!(a_server_start_moves_off_a_port_taken_meanwhile);

#[tokio::test]
async fn the_metrics_listener_moves_off_a_port_taken_meanwhile() {
    let fake = FakeServer::start().await;
    let taken = take_the_first_port_meanwhile();
    // Not waiting for the link: the fake accepts on this thread, later.
    let relay = Relay::start_at(
        fake.port,
        RelayOpts {
            metrics: true,
            wait_ready: false,
            ..Default::default()
        },
    );
    let port = relay.metrics_port.unwrap();
    assert_ne!(port, port_of(&taken));
    assert_eq!(listener_of(port, relay.pid().unwrap()), Some(true));
}
