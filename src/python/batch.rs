//! `_Batch`: an Arrow record batch of data points, handed to Python through the Arrow PyCapsule
//! interface (no copy, no Python loop).

use super::arrow_ffi;
use super::model::PyDataPoint;
use crate::columnar::{self, BatchOptions};
use arrow_array::RecordBatch;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

fn arrow_error(err: &arrow_schema::ArrowError) -> PyErr {
    PyValueError::new_err(format!("building the Arrow batch failed: {err}"))
}

/// The native half of `cm.Batch`.
#[pyclass(module = "capture_mqtt._core", name = "_Batch", frozen)]
pub struct PyBatch {
    pub batch: RecordBatch,
}

impl PyBatch {
    pub fn options(tag_columns: Vec<String>) -> BatchOptions {
        BatchOptions { tag_columns }
    }
}

// PyO3 extracts arguments as owned values.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl PyBatch {
    /// A batch of `points` (DataPoint objects).
    #[staticmethod]
    #[pyo3(signature = (points, tag_columns = Vec::new()))]
    fn from_points(
        points: Vec<PyRef<'_, PyDataPoint>>,
        tag_columns: Vec<String>,
    ) -> PyResult<Self> {
        let options = Self::options(tag_columns);
        let mut builder = columnar::BatchBuilder::new(options, points.len());
        for point in &points {
            builder.push(&point.point);
        }
        Ok(PyBatch {
            batch: builder.finish().map_err(|e| arrow_error(&e))?,
        })
    }

    /// One batch of several with the same columns.
    #[staticmethod]
    #[pyo3(signature = (batches, tag_columns = Vec::new()))]
    fn concat(batches: Vec<PyRef<'_, PyBatch>>, tag_columns: Vec<String>) -> PyResult<Self> {
        let schema = batches.first().map_or_else(
            || columnar::schema(&Self::options(tag_columns)),
            |b| b.batch.schema(),
        );
        let parts: Vec<RecordBatch> = batches.iter().map(|b| b.batch.clone()).collect();
        Ok(PyBatch {
            batch: columnar::concat(&schema, &parts).map_err(|e| arrow_error(&e))?,
        })
    }

    /// The same batch with its `tags` map as a struct of one field per tag name (see
    /// `columnar::tags_to_struct`).
    fn with_struct_tags(&self) -> PyResult<Self> {
        Ok(PyBatch {
            batch: columnar::tags_to_struct(&self.batch).map_err(|e| arrow_error(&e))?,
        })
    }

    fn __len__(&self) -> usize {
        self.batch.num_rows()
    }

    /// The names of the columns, in order.
    #[getter]
    fn column_names(&self) -> Vec<String> {
        self.batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        arrow_ffi::schema_capsule(py, self.batch.schema().as_ref())
    }

    /// The batch as an Arrow C stream. The PyCapsule interface lets a producer give its own schema
    /// when it cannot give the one requested: this one always does (its columns are fixed).
    #[pyo3(signature = (requested_schema = None))]
    #[allow(unused_variables)]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyCapsule>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        arrow_ffi::stream_capsule(py, self.batch.clone())
    }
}
