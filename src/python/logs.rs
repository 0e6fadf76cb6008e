//! Log records from the core, queued for the hub's logger: a tracing layer
//! writes each event (with its span's user, server and host) to a bounded
//! queue, and the Python side drains it ([`drain_logs`]) on its own thread,
//! so no tokio worker ever waits for the GIL.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use pyo3::prelude::*;

/// A queued log record: (Python `logging` level, target, message).
type Record = (u32, String, String);

/// Queued log records.
static LOGS: OnceLock<Mutex<VecDeque<Record>>> = OnceLock::new();
const MAX_QUEUED_LOGS: usize = 10_000;

fn logs() -> &'static Mutex<VecDeque<Record>> {
    LOGS.get_or_init(|| Mutex::new(VecDeque::new()))
}

/// The Python `logging` level of a tracing level (TRACE is logged as DEBUG).
fn python_level(level: &tracing::Level) -> u32 {
    match *level {
        tracing::Level::ERROR => 40,
        tracing::Level::WARN => 30,
        tracing::Level::INFO => 20,
        _ => 10,
    }
}

/// A tracing layer that queues events for Python. Each record carries the
/// fields of the spans it happened in (`user`, `server`, `host`: see
/// `spawner`), so every line of a spawn, poll or stop names its hub user,
/// server and host.
pub(super) struct QueueLayer;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}{}", self.0);
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = format!("{value}{}", self.0);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

/// The fields of one span, kept in its extensions.
#[derive(Default)]
struct SpanFields(Vec<(&'static str, String)>);

impl SpanFields {
    fn set(&mut self, name: &'static str, value: String) {
        // A name or host from a saved state could hold anything: one line
        // per record, whatever it holds.
        let value: String = value
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

impl tracing::field::Visit for SpanFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.set(field.name(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.set(field.name(), value.to_string());
    }
}

impl<S> tracing_subscriber::Layer<S> for QueueLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = SpanFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(fields) => values.record(fields),
                None => {
                    let mut fields = SpanFields::default();
                    values.record(&mut fields);
                    ext.insert(fields);
                }
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if !meta.target().starts_with("ssh_spawner") {
            return;
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        // The innermost span's value wins; a field the event sets itself
        // (e.g. `host` as address:port) is not repeated.
        let mut context = SpanFields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    for (name, value) in &f.0 {
                        context.set(name, value.clone());
                    }
                }
            }
        }
        for (name, value) in context.0 {
            if !event.metadata().fields().iter().any(|f| f.name() == name) {
                fields.0.push_str(&format!(" {name}={value}"));
            }
        }
        if let Ok(mut q) = logs().lock() {
            if q.len() >= MAX_QUEUED_LOGS {
                q.pop_front();
            }
            // Host text (stderr, log tails) arrives inside messages: no
            // control characters, and a continuation line is indented so it
            // never reads as a record of its own.
            q.push_back((
                python_level(meta.level()),
                meta.target().to_string(),
                crate::error::printable(&fields.0).replace('\n', "\n    "),
            ));
        }
    }
}

/// Take the queued log records: a list of (Python `logging` level, target,
/// message).
#[pyfunction]
pub(super) fn drain_logs() -> Vec<Record> {
    logs()
        .lock()
        .map(|mut q| q.drain(..).collect())
        .unwrap_or_default()
}
