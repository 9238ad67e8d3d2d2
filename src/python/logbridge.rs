//! Rust `log` records to Python's `logging`: records go into a bounded queue on the thread that logs
//! (no Python there), and a Python thread started by the package hands them to `logging`.

use crate::session::{Overflow, Pop, Queue};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

struct Record {
    level: u8,
    target: String,
    message: String,
}

fn queue() -> &'static Queue<Record> {
    static QUEUE: OnceLock<Queue<Record>> = OnceLock::new();
    QUEUE.get_or_init(|| Queue::new(10_000, Overflow::DropOldest))
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Bridge;

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // Our own records from DEBUG up; the libraries below us only from WARN (rumqttc logs every packet).
        if metadata.target().starts_with("_core") {
            metadata.level() <= log::Level::Debug
        } else {
            metadata.level() <= log::Level::Warn
        }
    }
    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => 40,
            log::Level::Warn => 30,
            log::Level::Info => 20,
            log::Level::Debug | log::Level::Trace => 10,
        };
        let target = record.target();
        let target = target
            .strip_prefix("_core::")
            .map_or_else(|| target.replace("::", "."), |t| t.replace("::", "."));
        let queue = queue();
        if queue.len() >= queue.capacity() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_control_bounded(Record {
            level,
            target,
            message: record.args().to_string(),
        });
    }
    fn flush(&self) {}
}

/// Installs the bridge as the process's Rust logger (once).
pub fn install() {
    static BRIDGE: Bridge = Bridge;
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

/// Waits up to `timeout` seconds for Rust log records: a list of (level, logger suffix, message).
#[pyfunction]
pub fn _next_logs(py: Python<'_>, timeout: f64) -> Vec<(u8, String, String)> {
    let wait = Duration::from_secs_f64(timeout.max(0.0));
    let first = super::detach(py, || queue().pop_wait(Some(wait)));
    let Pop::Item(first) = first else {
        return Vec::new();
    };
    std::iter::once(first)
        .chain(queue().drain(1000))
        .map(|r| (r.level, r.target, r.message))
        .collect()
}

/// Closes the queue at interpreter exit: the forwarding thread's wait returns at once, and the
/// records logged after it are dropped.
#[pyfunction]
pub fn _close_logs() {
    queue().close();
}

/// How many Rust log records were dropped because Python did not read them fast enough.
#[pyfunction]
pub fn _logs_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}
