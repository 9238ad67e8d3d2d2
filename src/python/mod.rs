//! The `PyO3` layer: thin classes and functions over the core modules. Nothing outside `src/python/`
//! knows of Python.

mod arrow_ffi;
mod batch;
mod codec;
mod convert;
mod errors;
mod gateway;
mod logbridge;
mod message;
mod model;
mod operation;
mod session;
mod subscription;

use pyo3::prelude::*;
use std::sync::OnceLock;
use std::thread::ThreadId;

/// The thread that ran the package's last exit handler (`_interpreter_exiting`), once it has.
static EXITING: OnceLock<ThreadId> = OnceLock::new();

/// `py.detach(f)` for the glue: runs `f` with the interpreter lock released, then takes it back.
///
/// Except while the interpreter finalizes. On Python 3.11 to 3.13 a thread that takes the lock back
/// then is ended by `pthread_exit`: a forced unwind through the Rust frames of this wait, which
/// crashes the process (1 exit in 5 with callback subscriptions and polling threads open). So a
/// thread coming back from `f` then parks instead, without the lock, until the process ends, as
/// Python 3.14 does itself. Only daemon threads are left then: the interpreter has joined the others.
///
/// Whether the interpreter finalizes is asked only once the package's last exit handler has run
/// (so it costs nothing before). Exit handlers registered before the package was imported run after
/// that one, and may still wait for a thread of the program: until finalization starts, threads
/// take the lock back as usual. Where the interpreter cannot be asked, they park from that handler on.
pub fn detach<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    py.detach(|| {
        let value = f();
        if EXITING
            .get()
            .is_some_and(|exiting| *exiting != std::thread::current().id())
            && finalizing().unwrap_or(true)
        {
            loop {
                std::thread::park();
            }
        }
        value
    })
}

/// Whether the interpreter finalizes, or None if it cannot be asked. `Py_IsFinalizing` (3.13) and
/// `_Py_IsFinalizing` (3.11, 3.12) are not in the stable ABI this extension is built for, so they
/// are looked up in the running interpreter; both read an atomic and need no lock.
#[cfg(unix)]
fn finalizing() -> Option<bool> {
    type IsFinalizing = unsafe extern "C" fn() -> std::os::raw::c_int;
    static FUNCTION: OnceLock<Option<IsFinalizing>> = OnceLock::new();
    let function = FUNCTION.get_or_init(|| {
        [c"Py_IsFinalizing", c"_Py_IsFinalizing"]
            .iter()
            .find_map(|name| {
                // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the interpreter
                // and the libraries it loaded.
                let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                // SAFETY: both functions take nothing and return an int, in every version.
                (!symbol.is_null()).then(|| unsafe {
                    std::mem::transmute::<*mut std::ffi::c_void, IsFinalizing>(symbol)
                })
            })
    });
    // SAFETY: a function of the running interpreter with the signature above.
    function.map(|is_finalizing| unsafe { is_finalizing() } != 0)
}

/// On Windows a thread ended while finalizing is not unwound (`_endthreadex`): nothing to avoid.
#[cfg(not(unix))]
#[allow(clippy::unnecessary_wraps)] // the shape of the Unix version
fn finalizing() -> Option<bool> {
    Some(false)
}

/// Called by the package's last exit handler, on the exiting thread: from now on other threads
/// coming back from a wait in the core check whether the interpreter finalizes (see `detach`). The
/// lock is released for a moment so that a thread already taking it back finishes first.
#[pyfunction]
fn _interpreter_exiting(py: Python<'_>) {
    let _ = EXITING.set(std::thread::current().id());
    py.detach(|| std::thread::sleep(std::time::Duration::from_millis(20)));
}

/// The native core of capture-mqtt. Use the `capture_mqtt` package, which re-exports what is public.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logbridge::install();
    session::init_runtime();
    m.add_class::<batch::PyBatch>()?;
    m.add_class::<gateway::PyGateway>()?;
    m.add_class::<session::PySession>()?;
    m.add_class::<subscription::PySubscription>()?;
    m.add_class::<operation::PyOperation>()?;
    m.add_class::<operation::PyCompletions>()?;
    m.add_class::<session::PyTokenRequest>()?;
    m.add_class::<message::PyMessage>()?;
    m.add_class::<message::PyMalformed>()?;
    m.add_function(wrap_pyfunction!(session::_jwt_expiry, m)?)?;
    m.add_function(wrap_pyfunction!(session::_now_ns, m)?)?;
    m.add_function(wrap_pyfunction!(session::_to_raw, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::_next_logs, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::_logs_dropped, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::_close_logs, m)?)?;
    m.add_function(wrap_pyfunction!(_interpreter_exiting, m)?)?;
    m.add_class::<model::PyDataPoint>()?;
    m.add_class::<model::PyCommand>()?;
    m.add_class::<model::PyTopicInfo>()?;
    m.add_function(wrap_pyfunction!(model::parse_raw, m)?)?;
    m.add_function(wrap_pyfunction!(model::parse_command, m)?)?;
    m.add_function(wrap_pyfunction!(model::parse_topic, m)?)?;
    m.add_function(wrap_pyfunction!(codec::raw_filter, m)?)?;
    m.add_function(wrap_pyfunction!(codec::raw_topic, m)?)?;
    m.add_function(wrap_pyfunction!(codec::data_topic, m)?)?;
    m.add_function(wrap_pyfunction!(codec::command_topic, m)?)?;
    m.add_function(wrap_pyfunction!(codec::validate_filter, m)?)?;
    m.add_function(wrap_pyfunction!(codec::topic_matches, m)?)?;
    m.add_function(wrap_pyfunction!(codec::_scope_rule, m)?)?;
    m.add_function(wrap_pyfunction!(codec::field_payload, m)?)?;
    m.add_function(wrap_pyfunction!(codec::measurement_payload, m)?)?;
    m.add_function(wrap_pyfunction!(codec::command_payload, m)?)?;
    Ok(())
}
