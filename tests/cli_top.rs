//! `nodetunnel top` rendered into ratatui's TestBackend from a given tunnel
//! table: trouble first, states, RTT, streams, throughput between two
//! refreshes, the summary, the error footer; q quits.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nodetunnel::admin::api::{ByteCounts, Summary, TunnelInfo, TunnelList};
use nodetunnel::cli::top::{render, Action, TopState};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

fn tunnel(node: &str, state: &str, rtt: Option<f64>, bytes: (u64, u64)) -> TunnelInfo {
    TunnelInfo {
        node: node.into(),
        addresses: vec!["10.0.0.1".into()],
        ssh_endpoint: "10.0.0.1:22".into(),
        state: state.into(),
        since: "2025-01-01T00:00:00Z".into(),
        for_seconds: 75,
        last_error: (state != "ready").then(|| "tcp connect to 10.0.0.3:22 failed: refused".into()),
        rtt,
        streams: if state == "ready" { 2 } else { 0 },
        streams_total: 5,
        stream_resets: 0,
        bytes: ByteCounts {
            to_node: bytes.0,
            from_node: bytes.1,
        },
        sessions_ready: usize::from(state == "ready"),
        sessions: 1,
        handshakes: 1,
        failures: BTreeMap::new(),
        consecutive_failures: 0,
        retry_in: None,
        retry_reason: None,
    }
}

fn table(bytes_a: (u64, u64)) -> TunnelList {
    let tunnels = vec![
        tunnel("node-a", "ready", Some(0.0004), bytes_a),
        tunnel("node-b", "ready", Some(0.025), (0, 0)),
        tunnel("node-c", "backoff", None, (0, 0)),
    ];
    TunnelList {
        conflicts: Vec::new(),
        summary: Summary::of(&tunnels, 2),
        tunnels,
        certificate: None,
        descriptors: None,
    }
}

/// The screen as lines of text.
fn screen(state: &TopState, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
    terminal
        .draw(|f| render(f, state))
        .expect("drawing into the test backend");
    let buffer = terminal.backend().buffer().clone();
    (0..height)
        .map(|y| {
            (0..width)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect::<String>()
                .trim_end()
                .to_string()
        })
        .collect()
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn renders_the_table_trouble_first_with_throughput() {
    let mut state = TopState::new("http://127.0.0.1:8133");
    let t0 = Instant::now();
    state.update(table((1_000, 2_000)), t0);
    // One second later node-a moved 2 KiB to the node and 1 KiB back.
    state.update(
        table((1_000 + 2048, 2_000 + 1024)),
        t0 + Duration::from_secs(1),
    );

    let lines = screen(&state, 110, 10);
    assert!(
        lines[0].starts_with("nodetunnel top  http://127.0.0.1:8133"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[1],
        "2/3 nodes ready, 4 streams open, 2 errors in the last minute (1 backoff)"
    );
    let header = &lines[2];
    for column in [
        "NODE",
        "STATE",
        "FOR",
        "RTT",
        "STREAMS",
        "TO NODE",
        "FROM NODE",
        "LAST ERROR",
    ] {
        assert!(header.contains(column), "{column} in {header:?}");
    }
    // Trouble first, then the slowest Ready node.
    assert!(lines[3].starts_with("node-c"), "{lines:#?}");
    assert!(lines[3].contains("backoff"), "{lines:#?}");
    assert!(
        lines[3].contains("tcp connect to 10.0.0.3:22 failed"),
        "{lines:#?}"
    );
    assert!(lines[4].starts_with("node-b"), "{lines:#?}");
    assert!(lines[4].contains("25.0ms"), "{lines:#?}");
    assert!(lines[5].starts_with("node-a"), "{lines:#?}");
    assert!(lines[5].contains("0.40ms"), "{lines:#?}");
    assert!(lines[5].contains("2.0KiB/s"), "{lines:#?}");
    assert!(lines[5].contains("1.0KiB/s"), "{lines:#?}");
    assert!(lines[5].contains("1m15s"), "{lines:#?}");
    assert!(lines[9].starts_with("q quit"), "{lines:#?}");

    // States are coloured.
    let mut terminal = Terminal::new(TestBackend::new(110, 10)).unwrap();
    terminal.draw(|f| render(f, &state)).unwrap();
    let buffer = terminal.backend().buffer();
    let state_x = lines[2].find("STATE").unwrap() as u16;
    assert_eq!(buffer[(state_x, 3)].fg, ratatui::style::Color::Red);
    assert_eq!(buffer[(state_x, 4)].fg, ratatui::style::Color::Green);
}

#[test]
fn a_failed_refresh_keeps_the_table_and_shows_the_error() {
    let mut state = TopState::new("unix:/run/nodetunnel/admin.sock");
    state.update(table((0, 0)), Instant::now());
    state.failed("cannot connect to the admin API".into());
    let lines = screen(&state, 100, 8);
    assert!(lines[3].starts_with("node-c"), "{lines:#?}");
    assert_eq!(
        lines[7],
        "admin API: cannot connect to the admin API (retrying)"
    );
    // The next success clears it.
    state.update(table((0, 0)), Instant::now());
    assert!(screen(&state, 100, 8)[7].starts_with("q quit"));
}

#[test]
fn before_the_first_answer_it_says_so() {
    let state = TopState::new("http://127.0.0.1:8133");
    let lines = screen(&state, 80, 5);
    assert_eq!(lines[1], "waiting for the first answer…");
}

#[test]
fn keys_scroll_and_q_quits() {
    let mut state = TopState::new("x");
    state.update(table((0, 0)), Instant::now());
    assert_eq!(state.handle_key(key(KeyCode::Down)), Action::Continue);
    assert_eq!(state.scroll, 1);
    let lines = screen(&state, 100, 8);
    assert!(
        lines[3].starts_with("node-b"),
        "scrolled by one: {lines:#?}"
    );
    state.handle_key(key(KeyCode::End));
    assert_eq!(state.scroll, 2, "scrolling stops at the last row");
    state.handle_key(key(KeyCode::Home));
    assert_eq!(state.scroll, 0);
    assert_eq!(state.handle_key(key(KeyCode::Char('x'))), Action::Continue);
    assert_eq!(state.handle_key(key(KeyCode::Char('q'))), Action::Quit);
    assert_eq!(state.handle_key(key(KeyCode::Esc)), Action::Quit);
    assert_eq!(
        state.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Action::Quit
    );
}
