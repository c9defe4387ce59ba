//! `nodetunnel top`: a live terminal view of the tunnels (state, RTT,
//! streams, throughput), refreshed from the admin API every second.
//!
//! The state ([`TopState`]: the last tunnel table, throughput computed
//! between refreshes, scrolling, the last fetch error) is kept apart from
//! drawing ([`render`]), so that a test renders a given table into
//! ratatui's `TestBackend`. Keys: `q`, Esc or Ctrl-C quit; arrows, `j`/`k`,
//! PgUp/PgDn, Home/End scroll.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

use super::client::AdminClient;
use super::format;
use super::status::summary_line;
use crate::admin::api::{trouble_order, ByteCounts, TunnelInfo, TunnelList};

/// What a key press asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep going.
    Continue,
    /// Leave `top`.
    Quit,
}

/// Throughput of one tunnel between the last two refreshes, bytes/second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// Towards the node.
    pub to_node: f64,
    /// From the node.
    pub from_node: f64,
}

/// Everything `top` shows, independent of drawing.
#[derive(Debug)]
pub struct TopState {
    /// Where the data comes from (shown in the title).
    pub source: String,
    /// The last table fetched.
    pub list: Option<TunnelList>,
    /// The last fetch error, cleared by the next success.
    pub error: Option<String>,
    /// Per-node throughput between the last two refreshes.
    pub throughput: HashMap<String, Throughput>,
    /// First row shown.
    pub scroll: usize,
    previous: Option<(Instant, HashMap<String, ByteCounts>)>,
}

impl TopState {
    /// An empty view of `source`.
    pub fn new(source: impl Into<String>) -> Self {
        TopState {
            source: source.into(),
            list: None,
            error: None,
            throughput: HashMap::new(),
            scroll: 0,
            previous: None,
        }
    }

    /// A new table fetched at `at`: throughput is the byte delta since the
    /// previous one (a counter that went down, a restarted tunnel, counts
    /// as zero).
    pub fn update(&mut self, list: TunnelList, at: Instant) {
        let counts: HashMap<String, ByteCounts> = list
            .tunnels
            .iter()
            .map(|t| (t.node.clone(), t.bytes))
            .collect();
        self.throughput.clear();
        if let Some((then, before)) = &self.previous {
            let seconds = at.saturating_duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                for (node, now) in &counts {
                    if let Some(old) = before.get(node) {
                        self.throughput.insert(
                            node.clone(),
                            Throughput {
                                to_node: now.to_node.saturating_sub(old.to_node) as f64 / seconds,
                                from_node: now.from_node.saturating_sub(old.from_node) as f64
                                    / seconds,
                            },
                        );
                    }
                }
            }
        }
        self.previous = Some((at, counts));
        self.list = Some(list);
        self.error = None;
        self.clamp_scroll();
    }

    /// A fetch failed; the last table stays on screen.
    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }

    /// The tunnels in display order: trouble first.
    pub fn rows(&self) -> Vec<&TunnelInfo> {
        let mut rows: Vec<&TunnelInfo> = self
            .list
            .as_ref()
            .map(|l| l.tunnels.iter().collect())
            .unwrap_or_default();
        rows.sort_by(|a, b| trouble_order(a, b));
        rows
    }

    /// React to a key.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind != KeyEventKind::Press {
            return Action::Continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit
            }
            KeyCode::Down | KeyCode::Char('j') => self.scroll = self.scroll.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_add(20),
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(20),
            KeyCode::Home => self.scroll = 0,
            KeyCode::End => self.scroll = usize::MAX,
            _ => {}
        }
        self.clamp_scroll();
        Action::Continue
    }

    fn clamp_scroll(&mut self) {
        let rows = self.list.as_ref().map(|l| l.tunnels.len()).unwrap_or(0);
        self.scroll = self.scroll.min(rows.saturating_sub(1));
    }
}

fn state_style(state: &str) -> Style {
    match state {
        "ready" => Style::default().fg(Color::Green),
        "connecting" => Style::default().fg(Color::Yellow),
        "backoff" => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        _ => Style::default().fg(Color::DarkGray),
    }
}

/// Draw `state` into the whole frame: a title and summary line, the
/// tunnel table, and a footer with the keys or the last error.
pub fn render(frame: &mut Frame, state: &TopState) {
    let [title, table, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let summary = match &state.list {
        Some(list) => summary_line(&list.summary, false),
        None => "waiting for the first answer…".to_string(),
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled(
                    "nodetunnel top",
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(format!("  {}", state.source)),
            ]),
            Line::from(summary),
        ]),
        title,
    );

    let header = Row::new(
        [
            "NODE",
            "STATE",
            "FOR",
            "RTT",
            "STREAMS",
            "TO NODE",
            "FROM NODE",
            "LAST ERROR",
        ]
        .map(Cell::from),
    )
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let rows: Vec<Row> = state
        .rows()
        .into_iter()
        .skip(state.scroll)
        .map(|t| {
            let speed = state.throughput.get(&t.node).copied().unwrap_or_default();
            let error = if t.is_ready() {
                String::new()
            } else {
                t.last_error.clone().unwrap_or_default()
            };
            Row::new(vec![
                Cell::from(t.node.clone()),
                Cell::from(t.state.clone()).style(state_style(&t.state)),
                Cell::from(format::age(t.for_seconds)),
                Cell::from(format::seconds(t.rtt)),
                Cell::from(t.streams.to_string()),
                Cell::from(format::rate(speed.to_node)),
                Cell::from(format::rate(speed.from_node)),
                Cell::from(error),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(longest_node(state).clamp(4, 40)),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Min(10),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        table,
    );

    let footer_line = match &state.error {
        Some(e) => Line::from(Span::styled(
            format!("admin API: {e} (retrying)"),
            Style::default().fg(Color::Red),
        )),
        None => Line::from(Span::styled(
            "q quit  ↑↓ scroll  refreshed every second",
            Style::default().fg(Color::DarkGray),
        )),
    };
    frame.render_widget(Paragraph::new(footer_line), footer);
}

fn longest_node(state: &TopState) -> u16 {
    state
        .list
        .as_ref()
        .and_then(|l| l.tunnels.iter().map(|t| t.node.chars().count()).max())
        .map(|n| u16::try_from(n).unwrap_or(u16::MAX))
        .unwrap_or(4)
}

/// Run the live view until `q`; exit 2 without a terminal or when the
/// terminal cannot be set up.
pub async fn run(client: AdminClient, interval: Duration) -> ExitCode {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        eprintln!("nodetunnel top: needs a terminal; use `nodetunnel status` in scripts");
        return ExitCode::from(2);
    }
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            eprintln!("nodetunnel top: cannot set up the terminal: {e}");
            return ExitCode::from(2);
        }
    };
    let result = event_loop(&mut terminal, &client, interval).await;
    ratatui::restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodetunnel top: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    client: &AdminClient,
    interval: Duration,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let reader_stop = stop.clone();
    // crossterm's reads block: a thread polls (bounded, so it sees `stop`)
    // and forwards events.
    let reader = std::thread::Builder::new()
        .name("top-input".into())
        .spawn(move || {
            while !reader_stop.load(Ordering::Relaxed) {
                match event::poll(Duration::from_millis(100)) {
                    Ok(true) => match event::read() {
                        Ok(ev) => {
                            if tx.blocking_send(ev).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    },
                    Ok(false) => {}
                    Err(_) => break,
                }
            }
        })?;
    let mut state = TopState::new(client.describe());
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let outcome = loop {
        if let Err(e) = terminal.draw(|f| render(f, &state)) {
            break Err(e);
        }
        tokio::select! {
            _ = tick.tick() => match client.get_json::<TunnelList>("/api/v1/tunnels").await {
                Ok(list) => state.update(list, Instant::now()),
                Err(e) => state.failed(e.to_string()),
            },
            ev = rx.recv() => match ev {
                Some(Event::Key(key)) => {
                    if state.handle_key(key) == Action::Quit {
                        break Ok(());
                    }
                }
                Some(_) => {}
                None => break Ok(()),
            },
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = reader.join();
    outcome
}
