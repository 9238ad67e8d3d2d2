//! The Arrow PyCapsule interface, both ways: a record batch handed to pandas, Polars or pyarrow
//! without a copy, and a DataFrame's `__arrow_c_stream__` read into record batches.
//!
//! A capsule holds an Arrow C struct (`ArrowSchema`, `ArrowArrayStream`) under the name the
//! interface fixes. The consumer moves the struct out and leaves a released one behind; a capsule
//! dropped unread releases its struct itself (the structs' `Drop`).

use arrow_array::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use arrow_array::{RecordBatch, RecordBatchIterator};
use arrow_schema::ffi::FFI_ArrowSchema;
use arrow_schema::Schema;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use std::ffi::CStr;

const SCHEMA: &CStr = c"arrow_schema";
const STREAM: &CStr = c"arrow_array_stream";

/// `schema` in an `arrow_schema` capsule (`__arrow_c_schema__`).
pub fn schema_capsule<'py>(py: Python<'py>, schema: &Schema) -> PyResult<Bound<'py, PyCapsule>> {
    let exported = FFI_ArrowSchema::try_from(schema)
        .map_err(|e| PyValueError::new_err(format!("exporting the Arrow schema failed: {e}")))?;
    PyCapsule::new_with_value(py, exported, SCHEMA)
}

/// A stream of one batch in an `arrow_array_stream` capsule (`__arrow_c_stream__`).
pub fn stream_capsule(py: Python<'_>, batch: RecordBatch) -> PyResult<Bound<'_, PyCapsule>> {
    let schema = batch.schema();
    let reader = RecordBatchIterator::new(std::iter::once(Ok(batch)), schema);
    PyCapsule::new_with_value(py, FFI_ArrowArrayStream::new(Box::new(reader)), STREAM)
}

/// The record batches of an `arrow_array_stream` capsule, which this takes over.
pub fn import_stream(capsule: &Bound<'_, PyCapsule>) -> PyResult<ArrowArrayStreamReader> {
    let pointer = capsule
        .pointer_checked(Some(STREAM))?
        .cast::<FFI_ArrowArrayStream>();
    // SAFETY: the capsule is named arrow_array_stream, so by the interface it holds an initialized
    // ArrowArrayStream. `from_raw` moves it out and leaves a released stream in the capsule, which
    // its producer's capsule destructor then skips.
    let stream = unsafe { FFI_ArrowArrayStream::from_raw(pointer.as_ptr()) };
    ArrowArrayStreamReader::try_new(stream)
        .map_err(|e| PyValueError::new_err(format!("reading the Arrow stream failed: {e}")))
}
