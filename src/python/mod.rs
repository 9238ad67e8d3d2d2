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
