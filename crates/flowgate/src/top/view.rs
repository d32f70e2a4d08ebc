//! What `flowgate top` shows: rows with rates from two samples, their order and filter,
//! the keys that change them, and the drawing of one frame. Everything here is a pure
//! function of the samples and the UI state, so it is tested with ratatui's
//! `TestBackend`; the network and the terminal are in the parent module.

use std::cmp::Ordering;
use std::time::Duration;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row as TableRow, Table};
use ratatui::Frame;

use super::sample::{Component, Concurrency, Kind, Lag, Sample};

/// One line of the table: a component with its rates.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Pipeline, sink, source or topic.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Events in per second (`None`: unknown, or only one sample yet).
    pub in_rate: Option<f64>,
    /// Events out per second.
    pub out_rate: Option<f64>,
    /// How far behind it is.
    pub lag: Option<Lag>,
    /// Errors, total.
    pub errors: Option<u64>,
    /// Errors per second.
    pub error_rate: Option<f64>,
    /// Sink batch target.
    pub batch: Option<u64>,
    /// Sink write concurrency.
    pub concurrency: Option<Concurrency>,
    /// Breaker, worker or connection state.
    pub state: Option<String>,
}

/// Per-second rate of a counter between two readings `secs` apart. A counter that went
/// down was reset (the engine restarted): its whole current value counts as the
/// increase, as Prometheus's `rate` does.
pub fn rate(prev: Option<u64>, cur: Option<u64>, secs: f64) -> Option<f64> {
    let (prev, cur) = (prev?, cur?);
    if secs <= 0.0 || !secs.is_finite() {
        return None;
    }
    let increase = if cur >= prev { cur - prev } else { cur };
    Some(increase as f64 / secs)
}

/// The rows of `cur`, with rates against `prev` (the sample before it) when there is one.
pub fn rows(prev: Option<&Sample>, cur: &Sample) -> Vec<Row> {
    let secs = prev.map_or(0.0, |p| cur.at.saturating_duration_since(p.at).as_secs_f64());
    cur.components
        .iter()
        .map(|c| {
            let before: Option<&Component> =
                prev.and_then(|p| p.components.iter().find(|b| b.kind == c.kind && b.name == c.name));
            Row {
                kind: c.kind,
                name: c.name.clone(),
                in_rate: rate(before.and_then(|b| b.events_in), c.events_in, secs),
                out_rate: rate(before.and_then(|b| b.events_out), c.events_out, secs),
                lag: c.lag,
                errors: c.errors,
                error_rate: rate(before.and_then(|b| b.errors), c.errors, secs),
                batch: c.batch,
                concurrency: c.concurrency,
                state: c.state.clone(),
            }
        })
        .collect()
}

/// The column rows are sorted by; `s` moves to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    /// Kind, then name (the default).
    Kind,
    /// Name.
    Name,
    /// Events in per second, highest first.
    In,
    /// Events out per second, highest first.
    Out,
    /// Lag, highest first.
    Lag,
    /// Errors, most first.
    Errors,
    /// Batch target, largest first.
    Batch,
    /// Writes in flight, most first.
    Concurrency,
}

impl SortBy {
    /// The order `s` cycles through.
    pub const ALL: [SortBy; 8] = [
        SortBy::Kind,
        SortBy::Name,
        SortBy::In,
        SortBy::Out,
        SortBy::Lag,
        SortBy::Errors,
        SortBy::Batch,
        SortBy::Concurrency,
    ];

    /// The next column.
    pub fn next(self) -> SortBy {
        let i = SortBy::ALL.iter().position(|s| *s == self).unwrap_or(0);
        SortBy::ALL[(i + 1) % SortBy::ALL.len()]
    }

    /// Its column's position in the table.
    fn column(self) -> usize {
        match self {
            SortBy::Kind => 0,
            SortBy::Name => 1,
            SortBy::In => 2,
            SortBy::Out => 3,
            SortBy::Lag => 4,
            SortBy::Errors => 5,
            SortBy::Batch => 6,
            SortBy::Concurrency => 7,
        }
    }

    /// Its name in the status line.
    pub fn as_str(self) -> &'static str {
        ["kind", "name", "in/s", "out/s", "lag", "errors", "batch", "concurrency"][self.column()]
    }
}

fn lag_key(lag: Option<Lag>) -> Option<f64> {
    lag.map(|l| match l {
        Lag::Events(n) => n as f64,
        Lag::Seconds(s) => s,
    })
}

/// Compares present values, highest first; an unknown value goes after every known one.
fn desc(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => b.total_cmp(&a),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Sorts `rows` by `by` (names and kinds A to Z, numbers highest first), reversed when
/// `reverse`; ties keep kind-then-name order.
pub fn sort(rows: &mut [Row], by: SortBy, reverse: bool) {
    let base = |a: &Row, b: &Row| a.kind.cmp(&b.kind).then_with(|| a.name.cmp(&b.name));
    rows.sort_by(|a, b| {
        let primary = match by {
            SortBy::Kind => Ordering::Equal,
            SortBy::Name => a.name.cmp(&b.name),
            SortBy::In => desc(a.in_rate, b.in_rate),
            SortBy::Out => desc(a.out_rate, b.out_rate),
            SortBy::Lag => desc(lag_key(a.lag), lag_key(b.lag)),
            SortBy::Errors => desc(a.errors.map(|e| e as f64), b.errors.map(|e| e as f64)),
            SortBy::Batch => desc(a.batch.map(|e| e as f64), b.batch.map(|e| e as f64)),
            SortBy::Concurrency => {
                desc(a.concurrency.map(|c| f64::from(c.in_flight)), b.concurrency.map(|c| f64::from(c.in_flight)))
            }
        };
        let order = primary.then_with(|| base(a, b));
        if reverse {
            order.reverse()
        } else {
            order
        }
    });
}

/// Whether `row` matches the filter: the text appears, ignoring case, in its kind and
/// name (`sink` keeps the sinks, `orders` every component with `orders` in its name).
pub fn matches(row: &Row, filter: &str) -> bool {
    let filter = filter.trim().to_lowercase();
    filter.is_empty() || format!("{} {}", row.kind.as_str(), row.name).to_lowercase().contains(&filter)
}

/// What the keys have set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UiState {
    /// The sort column.
    pub sort: SortBy,
    /// Reverse the order.
    pub reverse: bool,
    /// Only rows matching this text.
    pub filter: String,
    /// Whether keys are typing the filter (after `/`, until Enter or Esc).
    pub editing_filter: bool,
    /// Whether the view is frozen (`p`).
    pub paused: bool,
}

impl Default for UiState {
    fn default() -> Self {
        UiState { sort: SortBy::Kind, reverse: false, filter: String::new(), editing_filter: false, paused: false }
    }
}

/// What a key asks of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep going (redraw).
    Continue,
    /// Leave `top`.
    Quit,
}

impl UiState {
    /// Applies one key press.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::Continue;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.editing_filter {
            match key.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => self.filter.push(c),
                _ => {}
            }
            return Action::Continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Char('Q') => return Action::Quit,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Char('p') | KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Esc => self.filter.clear(),
            _ => {}
        }
        Action::Continue
    }
}

/// Whether the engine answered the last time `top` asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    /// No answer yet.
    Connecting,
    /// The last sample came through.
    Up,
    /// The last attempt failed with this error; `top` keeps trying.
    Down {
        /// Why.
        error: String,
        /// Failed attempts in a row.
        attempts: u64,
    },
}

/// Everything one frame is drawn from.
#[derive(Clone, Copy, Debug)]
pub struct Screen<'a> {
    /// The engine's HTTP address, as given.
    pub addr: &'a str,
    /// How often `top` samples.
    pub interval: Duration,
    /// The sample before `cur`.
    pub prev: Option<&'a Sample>,
    /// The latest sample shown.
    pub cur: Option<&'a Sample>,
    /// The keys' state.
    pub ui: &'a UiState,
    /// The connection.
    pub link: &'a Link,
}

/// `1234567` as `1.23M`; whole numbers below 10,000 as they are.
pub fn human(n: f64) -> String {
    let a = n.abs();
    if a < 10_000.0 {
        if n.fract() == 0.0 || a >= 100.0 {
            format!("{n:.0}")
        } else {
            format!("{n:.1}")
        }
    } else if a < 1e6 {
        format!("{:.1}k", n / 1e3)
    } else if a < 1e9 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{:.2}G", n / 1e9)
    }
}

/// Bytes as KiB, MiB or GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds as `3d04h`, `2h05m`, `4m09s` or `12s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), human)
}

fn cells(row: &Row) -> [String; 9] {
    let lag = match row.lag {
        None => "-".to_owned(),
        Some(Lag::Events(n)) => human(n as f64),
        Some(Lag::Seconds(s)) => format!("{s:.1}s"),
    };
    let concurrency = match row.concurrency {
        None => "-".to_owned(),
        Some(Concurrency { in_flight, limit: Some(l) }) => format!("{in_flight}/{l}"),
        Some(Concurrency { in_flight, limit: None }) => format!("{in_flight}/∞"),
    };
    [
        row.kind.as_str().to_owned(),
        row.name.clone(),
        opt(row.in_rate),
        opt(row.out_rate),
        lag,
        row.errors.map_or_else(|| "-".to_owned(), |e| human(e as f64)),
        row.batch.map_or_else(|| "-".to_owned(), |b| human(b as f64)),
        concurrency,
        row.state.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

const HEADERS: [&str; 9] = ["KIND", "NAME", "IN/S", "OUT/S", "LAG", "ERRORS", "BATCH", "CONC", "STATE"];

fn state_style(row: &Row) -> Style {
    match row.state.as_deref() {
        Some(s) if s == "open" || s.starts_with("restarting") => Style::new().fg(Color::Red),
        Some(s) if s == "half_open" || s.starts_with("starting") || s == "reconnecting" || s == "connecting" => {
            Style::new().fg(Color::Yellow)
        }
        _ if row.error_rate.is_some_and(|r| r > 0.0) => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

/// Draws one frame of `top`.
pub fn draw(frame: &mut Frame, screen: &Screen) {
    let [header, table_area, footer] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    draw_header(frame, header, screen);
    draw_table(frame, table_area, screen);
    let keys = if screen.ui.editing_filter {
        "type to filter · Enter keep · Esc clear".to_owned()
    } else {
        "q quit · s sort · r reverse · / filter · p pause".to_owned()
    };
    frame.render_widget(Paragraph::new(keys).style(Style::new().add_modifier(Modifier::DIM)), footer);
}

fn draw_header(frame: &mut Frame, area: Rect, screen: &Screen) {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut first = vec![Span::styled("flowgate top", bold), Span::raw(format!("  {}", screen.addr))];
    if let Some(cur) = screen.cur {
        if let Some(up) = cur.uptime_secs {
            first.push(Span::raw(format!("  up {}", duration(up))));
        }
        match cur.ready {
            Some(true) => first.push(Span::styled("  ready", Style::new().fg(Color::Green))),
            Some(false) => first.push(Span::styled("  not ready", Style::new().fg(Color::Red))),
            None => {}
        }
    }
    first.push(Span::raw(format!("  every {}ms", screen.interval.as_millis())));
    if screen.ui.paused {
        first.push(Span::styled("  PAUSED", Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)));
    }

    let memory = match screen.cur.and_then(|c| c.memory.as_ref()) {
        Some(m) => {
            let color = match m.level.as_str() {
                "hard" => Color::Red,
                "soft" => Color::Yellow,
                _ => Color::Green,
            };
            Line::from(vec![
                Span::raw(format!(
                    "memory {} / {} ({:.1}%, peak {}) ",
                    bytes(m.used),
                    bytes(m.limit),
                    m.pressure * 100.0,
                    bytes(m.peak)
                )),
                Span::styled(format!("pressure {}", m.level), Style::new().fg(color)),
            ])
        }
        None => Line::raw("memory -"),
    };
    let mut memory = memory;
    if let Some(cur) = screen.cur {
        let firing: Vec<&(String, String, String)> = cur.alerts.iter().filter(|a| a.2 == "firing").collect();
        if !firing.is_empty() {
            let critical = firing.iter().any(|a| a.1 == "critical");
            let names: Vec<&str> = firing.iter().map(|a| a.0.as_str()).collect();
            memory.spans.push(Span::styled(
                format!("  ALERTS {}: {}", firing.len(), names.join(", ")),
                Style::new().fg(if critical { Color::Red } else { Color::Yellow }).add_modifier(Modifier::BOLD),
            ));
        }
    }

    let status = match screen.link {
        Link::Connecting => Line::styled(format!("connecting to {}…", screen.addr), Style::new().fg(Color::Yellow)),
        Link::Down { error, attempts } => Line::styled(
            format!(
                "engine unreachable ({attempts} failed in a row, retrying every {}ms; the table shows the last sample): {error}",
                screen.interval.as_millis()
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Link::Up => {
            let order = if screen.ui.reverse { "reversed" } else { "" };
            let mut spans = vec![Span::raw(format!("sort {} {order}", screen.ui.sort.as_str()))];
            if screen.ui.editing_filter || !screen.ui.filter.is_empty() {
                let cursor = if screen.ui.editing_filter { "▏" } else { "" };
                spans.push(Span::styled(
                    format!("  filter /{}{cursor}", screen.ui.filter),
                    Style::new().fg(Color::Cyan),
                ));
            }
            Line::from(spans)
        }
    };
    frame.render_widget(Paragraph::new(vec![Line::from(first), memory, status]), area);
}

fn draw_table(frame: &mut Frame, area: Rect, screen: &Screen) {
    let mut shown = screen.cur.map(|cur| rows(screen.prev, cur)).unwrap_or_default();
    let total = shown.len();
    shown.retain(|r| matches(r, &screen.ui.filter));
    sort(&mut shown, screen.ui.sort, screen.ui.reverse);

    let sorted = screen.ui.sort.column();
    let header = TableRow::new(HEADERS.iter().enumerate().map(|(i, h)| {
        let text =
            if i == sorted { format!("{h}{}", if screen.ui.reverse { "▲" } else { "▼" }) } else { (*h).to_owned() };
        Cell::from(text)
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let body = shown.iter().map(|r| TableRow::new(cells(r).map(Cell::from)).style(state_style(r)));
    let title = if shown.len() == total {
        format!(" {total} components ")
    } else {
        format!(" {} of {total} components ", shown.len())
    };
    let widths = [
        Constraint::Length(8),
        Constraint::Min(16),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(14),
    ];
    let table = Table::new(body, widths).header(header).block(Block::new().borders(Borders::TOP).title(title));
    frame.render_widget(table, area);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::KeyEvent;
    use ratatui::Terminal;

    use super::*;

    fn component(kind: Kind, name: &str, events_in: u64, errors: u64) -> Component {
        Component {
            kind,
            name: name.to_owned(),
            events_in: Some(events_in),
            events_out: None,
            lag: None,
            errors: Some(errors),
            batch: None,
            concurrency: None,
            state: None,
        }
    }

    fn sample(at: Instant, components: Vec<Component>) -> Sample {
        Sample { at, uptime_secs: Some(5), ready: Some(true), memory: None, components, alerts: Vec::new() }
    }

    #[test]
    fn rates_divide_the_increase_by_the_time_between_samples() {
        assert_eq!(rate(Some(100), Some(300), 2.0), Some(100.0));
        assert_eq!(rate(Some(100), Some(100), 1.0), Some(0.0));
        // A reset counter (restarted engine) counts its whole value.
        assert_eq!(rate(Some(500), Some(20), 1.0), Some(20.0));
        assert_eq!(rate(None, Some(20), 1.0), None);
        assert_eq!(rate(Some(1), None, 1.0), None);
        assert_eq!(rate(Some(1), Some(2), 0.0), None);
    }

    #[test]
    fn rows_take_rates_from_the_matching_component_of_the_previous_sample() {
        let t0 = Instant::now();
        let prev = sample(t0, vec![component(Kind::Pipeline, "a", 1000, 0), component(Kind::Topic, "a", 10, 0)]);
        let cur = sample(
            t0 + Duration::from_millis(500),
            vec![
                component(Kind::Pipeline, "a", 1500, 2),
                component(Kind::Topic, "a", 60, 0),
                component(Kind::Pipeline, "new", 7, 0),
            ],
        );
        let rows = rows(Some(&prev), &cur);
        assert_eq!(rows[0].in_rate, Some(1000.0));
        assert_eq!(rows[0].error_rate, Some(4.0));
        assert_eq!(rows[1].in_rate, Some(100.0));
        assert_eq!(rows[2].in_rate, None, "no earlier reading: no rate yet");
        // The first sample alone has no rates.
        assert!(super::rows(None, &cur).iter().all(|r| r.in_rate.is_none()));
    }

    fn row(kind: Kind, name: &str, in_rate: Option<f64>) -> Row {
        Row {
            kind,
            name: name.to_owned(),
            in_rate,
            out_rate: None,
            lag: None,
            errors: None,
            error_rate: None,
            batch: None,
            concurrency: None,
            state: None,
        }
    }

    fn names(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn sorting_puts_numbers_highest_first_unknowns_last_and_reverses() {
        let mut rows = vec![
            row(Kind::Topic, "t", Some(5.0)),
            row(Kind::Pipeline, "b", None),
            row(Kind::Pipeline, "a", Some(50.0)),
            row(Kind::Sink, "a/out", Some(7.0)),
        ];
        sort(&mut rows, SortBy::Kind, false);
        assert_eq!(names(&rows), ["a", "b", "a/out", "t"]);
        sort(&mut rows, SortBy::Name, false);
        assert_eq!(names(&rows), ["a", "a/out", "b", "t"]);
        sort(&mut rows, SortBy::In, false);
        assert_eq!(names(&rows), ["a", "a/out", "t", "b"]);
        sort(&mut rows, SortBy::In, true);
        assert_eq!(names(&rows), ["b", "t", "a/out", "a"]);
    }

    #[test]
    fn the_filter_matches_kind_and_name_ignoring_case() {
        let r = row(Kind::Sink, "Orders/out", None);
        assert!(matches(&r, ""));
        assert!(matches(&r, "orders"));
        assert!(matches(&r, "SINK"));
        assert!(matches(&r, "sink orders"));
        assert!(!matches(&r, "pipeline"));
        assert!(!matches(&r, "payments"));
    }

    fn press(ui: &mut UiState, code: KeyCode) -> Action {
        ui.handle_key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    #[test]
    fn keys_cycle_the_sort_reverse_filter_pause_and_quit() {
        let mut ui = UiState::default();
        for expected in [SortBy::Name, SortBy::In, SortBy::Out] {
            press(&mut ui, KeyCode::Char('s'));
            assert_eq!(ui.sort, expected);
        }
        for _ in 0..SortBy::ALL.len() {
            press(&mut ui, KeyCode::Char('s'));
        }
        assert_eq!(ui.sort, SortBy::Out, "s cycles through every column and back");
        press(&mut ui, KeyCode::Char('r'));
        assert!(ui.reverse);
        press(&mut ui, KeyCode::Char('/'));
        // While typing, q and s are text.
        for c in "qs".chars() {
            assert_eq!(press(&mut ui, KeyCode::Char(c)), Action::Continue);
        }
        press(&mut ui, KeyCode::Backspace);
        press(&mut ui, KeyCode::Enter);
        assert_eq!((ui.filter.as_str(), ui.editing_filter), ("q", false));
        press(&mut ui, KeyCode::Char('/'));
        press(&mut ui, KeyCode::Char('x'));
        press(&mut ui, KeyCode::Esc);
        assert_eq!(ui.filter, "", "Esc drops the filter");
        press(&mut ui, KeyCode::Char('p'));
        assert!(ui.paused);
        assert_eq!(press(&mut ui, KeyCode::Char('q')), Action::Quit);
        assert_eq!(ui.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
    }

    fn render(screen: &Screen) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 20)).unwrap();
        terminal.draw(|f| draw(f, screen)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn an_unreachable_engine_is_said_and_the_last_sample_stays() {
        let t0 = Instant::now();
        let cur = sample(t0, vec![component(Kind::Pipeline, "orders", 1, 0)]);
        let ui = UiState::default();
        let link = Link::Down { error: "connection refused".into(), attempts: 3 };
        let screen = Screen {
            addr: "127.0.0.1:7071",
            interval: Duration::from_secs(1),
            prev: None,
            cur: Some(&cur),
            ui: &ui,
            link: &link,
        };
        let text = render(&screen);
        assert!(text.contains("engine unreachable"), "{text}");
        assert!(text.contains("orders"), "{text}");
        // Nothing at all yet: still a frame, no panic.
        let screen = Screen { cur: None, link: &Link::Connecting, ..screen };
        assert!(render(&screen).contains("connecting to 127.0.0.1:7071"));
    }

    #[test]
    fn firing_alerts_are_named_in_the_header() {
        let t0 = Instant::now();
        let mut cur = sample(t0, vec![component(Kind::Pipeline, "orders", 1, 0)]);
        cur.alerts = vec![
            ("sink failing".into(), "critical".into(), "firing".into()),
            ("maybe later".into(), "warning".into(), "pending".into()),
        ];
        let ui = UiState::default();
        let screen = Screen {
            addr: "127.0.0.1:7071",
            interval: Duration::from_secs(1),
            prev: None,
            cur: Some(&cur),
            ui: &ui,
            link: &Link::Up,
        };
        let text = render(&screen);
        assert!(text.contains("ALERTS 1: sink failing"), "{text}");
        assert!(!text.contains("maybe later"), "pending alerts are not shown: {text}");
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(2.5), "2.5");
        assert_eq!(human(1234.0), "1234");
        assert_eq!(human(12_345.0), "12.3k");
        assert_eq!(human(2_500_000.0), "2.50M");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(duration(3725), "1h02m");
        assert_eq!(duration(59), "59s");
    }
}
