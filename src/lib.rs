//! The Rust core of capture-mqtt. The modules below know nothing of Python; `python` is the `PyO3`
//! layer, built only with the `python` feature (maturin turns it on).

pub mod columnar;
pub mod frame_columns;
pub mod gateway;
pub mod outbox;
pub mod payload;
pub mod scope;
pub mod session;
pub mod timestamp;
pub mod topic;

#[cfg(test)]
mod proptests;

#[cfg(feature = "python")]
mod python;
