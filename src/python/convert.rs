//! Conversions between Python objects and the core's JSON values and nanosecond timestamps.

use super::errors::{payload_error_in, timestamp_error};
use crate::payload::PushTime;
use crate::timestamp::{self, Naive, NANOS_PER_SEC};
use chrono::{Datelike, Timelike};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};
use serde_json::{Map, Number, Value};
use std::borrow::Cow;

static DATETIME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static UTC: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static EPOCH_UTC: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static EPOCH_NAIVE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn datetime_class(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    DATETIME.import(py, "datetime", "datetime")
}

fn utc(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    UTC.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("datetime")?
                .getattr("timezone")?
                .getattr("utc")?
                .unbind(),
        )
    })
    .map(|utc| utc.bind(py))
}

fn epoch(py: Python<'_>, aware: bool) -> PyResult<&Bound<'_, PyAny>> {
    let cell = if aware { &EPOCH_UTC } else { &EPOCH_NAIVE };
    cell.get_or_try_init(py, || {
        let tz = if aware {
            utc(py)?.clone()
        } else {
            py.None().into_bound(py)
        };
        Ok::<_, PyErr>(
            datetime_class(py)?
                .call1((1970, 1, 1, 0, 0, 0, 0, tz))?
                .unbind(),
        )
    })
    .map(|epoch| epoch.bind(py))
}

/// Nanoseconds since the epoch as an aware UTC `datetime` (microsecond precision, Python's limit).
pub fn nanos_to_datetime(py: Python<'_>, nanos: i64) -> PyResult<Bound<'_, PyAny>> {
    let (secs, sub) = timestamp::split_nanos(nanos);
    let dt = chrono::DateTime::from_timestamp(secs, sub)
        .unwrap_or_default()
        .naive_utc();
    datetime_class(py)?.call1((
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        sub / 1000,
        utc(py)?,
    ))
}

/// Whether `obj` is a `datetime.datetime` (or a subclass such as `pandas.Timestamp`).
pub fn is_datetime(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    obj.is_instance(datetime_class(obj.py())?)
}

/// A `datetime` as nanoseconds since the epoch; a naive one as `naive` says (refused by default).
pub fn datetime_to_nanos(obj: &Bound<'_, PyAny>, field: &str, naive: Naive) -> PyResult<i64> {
    let py = obj.py();
    let aware = !obj.getattr("tzinfo")?.is_none() && !obj.call_method0("utcoffset")?.is_none();
    if !aware {
        let wall = aware_or_wall_nanos(obj, field, false)?;
        return naive.resolve(wall).ok_or_else(|| {
            let shown = obj.str().map(|s| s.to_string()).unwrap_or_default();
            payload_error_in(
                py,
                field,
                &format!(
                    "{field} {shown} is a naive datetime (no tzinfo): Python reads it as local time, Capture as \
                     UTC, so it would be shifted by the UTC offset; pass an aware datetime \
                     (datetime.now(timezone.utc), dt.replace(tzinfo=...)), or say what it means with \
                     naive=\"utc\" or naive=\"local\""
                ),
            )
        });
    }
    aware_or_wall_nanos(obj, field, true)
}

/// Nanoseconds since the epoch of an aware `datetime`, or of a naive one's wall-clock time read as UTC.
fn aware_or_wall_nanos(obj: &Bound<'_, PyAny>, field: &str, aware: bool) -> PyResult<i64> {
    let py = obj.py();
    if aware && obj.get_type().is(datetime_class(py)?) {
        // A plain aware datetime (the common case): two calls. The float seconds are exact to far
        // better than half a second; the microseconds come exactly from the attribute.
        let seconds = obj
            .call_method0("timestamp")
            .and_then(|t| t.extract::<f64>());
        let micros = obj.getattr("microsecond").and_then(|m| m.extract::<i64>());
        if let (Ok(seconds), Ok(micros)) = (seconds, micros) {
            #[allow(clippy::cast_precision_loss)] // below a million: exact
            let whole = (seconds - micros as f64 / 1e6).round();
            if whole.is_finite() && whole.abs() < 9.2e9 {
                #[allow(clippy::cast_possible_truncation)] // bounded just above
                let whole = whole as i64;
                return Ok(whole * NANOS_PER_SEC + micros * 1000);
            }
        }
    }
    let delta = obj.sub(epoch(py, aware)?)?;
    let days: i64 = delta.getattr("days")?.extract()?;
    let seconds: i64 = delta.getattr("seconds")?.extract()?;
    let micros: i64 = delta.getattr("microseconds")?.extract()?;
    // pandas.Timedelta carries the nanoseconds below the microsecond.
    let extra_nanos: i64 = match delta.getattr("nanoseconds") {
        Ok(ns) => ns.extract().unwrap_or(0),
        Err(_) => 0,
    };
    days.checked_mul(86_400 * NANOS_PER_SEC)
        .and_then(|n| n.checked_add(seconds * NANOS_PER_SEC + micros * 1000 + extra_nanos))
        .ok_or_else(|| {
            payload_error_in(
                py,
                field,
                &format!("{field} is outside the years 1678 to 2262"),
            )
        })
}

/// A user's timestamp for a push: `None` (Capture stamps it), a `datetime` (a naive one as `naive`
/// says), epoch milliseconds as an `int`, or an ISO 8601 string.
pub fn push_time(obj: Option<&Bound<'_, PyAny>>, field: &str, naive: Naive) -> PyResult<PushTime> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(PushTime::Omit);
    };
    let py = obj.py();
    if obj.is_instance_of::<PyBool>() {
        return Err(payload_error_in(py, field, &format!("{field} is a bool; pass a datetime, epoch milliseconds (int) or an ISO 8601 string")));
    }
    if obj.is_instance_of::<PyInt>() {
        let ms: i64 = obj.extract().map_err(|_| {
            payload_error_in(py, field, &format!("{field} {obj} does not fit in 64 bits"))
        })?;
        return timestamp::check_epoch_ms(ms)
            .map(PushTime::EpochMs)
            .map_err(|e| timestamp_error(py, field, &e));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return timestamp::parse_iso8601(text.to_str()?)
            .map(PushTime::Iso)
            .map_err(|e| timestamp_error(py, field, &e));
    }
    if is_datetime(obj)? {
        return datetime_to_nanos(obj, field, naive).map(PushTime::Iso);
    }
    let kind = obj.get_type().name()?;
    let hint = if obj.is_instance_of::<PyFloat>() {
        "pass epoch milliseconds as an int, or a datetime"
    } else {
        "pass a datetime, epoch milliseconds (int) or an ISO 8601 string"
    };
    Err(payload_error_in(
        py,
        field,
        &format!("{field} has type {kind}; {hint}"),
    ))
}

/// Converts a Python value to JSON for a payload. `nested` allows None, lists and dicts (command data);
/// without it only int, float, bool and str pass (what Capture stores). NaN and infinities are refused.
pub fn to_json(obj: &Bound<'_, PyAny>, field: &str, nested: bool) -> PyResult<Value> {
    let py = obj.py();
    if obj.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(obj.extract()?));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(Value::from(v));
        }
        if let Ok(v) = obj.extract::<u64>() {
            return Ok(Value::from(v));
        }
        return Err(payload_error_in(
            py,
            field,
            &format!("{field} = {obj} does not fit in 64 bits; send it as a float or a string"),
        ));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        return Number::from_f64(v).map(Value::Number).ok_or_else(|| {
            payload_error_in(py, field, &format!("{field} is {v}; JSON cannot carry NaN or infinity: leave the field out or send a finite number"))
        });
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(Value::String(text.to_str()?.to_owned()));
    }
    // numpy scalars (np.int64, np.float32, np.bool_, ...) turn into Python values through .item().
    if obj.hasattr("dtype")? && obj.hasattr("item")? {
        let item = obj.call_method0("item")?;
        if !item.is(obj) {
            return to_json(&item, field, nested);
        }
    }
    if nested {
        if obj.is_none() {
            return Ok(Value::Null);
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let mut items = Vec::new();
            for (i, item) in obj.try_iter()?.enumerate() {
                items.push(to_json(&item?, &format!("{field}[{i}]"), true)?);
            }
            return Ok(Value::Array(items));
        }
        if let Ok(dict) = obj.cast::<PyDict>() {
            let mut map = Map::new();
            for (key, value) in dict.iter() {
                let Ok(key) = key.cast::<PyString>() else {
                    return Err(payload_error_in(py, field, &format!("{field} has a key {key} that is not a str; JSON object keys are strings")));
                };
                let key = key.to_str()?.to_owned();
                let value = to_json(&value, &format!("{field}[{key:?}]"), true)?;
                map.insert(key, value);
            }
            return Ok(Value::Object(map));
        }
    }
    let kind = obj.get_type().name()?;
    let allowed = if nested {
        "int, float, bool, str, None, list or dict"
    } else {
        "int, float, bool or str"
    };
    Err(payload_error_in(
        py,
        field,
        &format!("{field} has type {kind}; Capture takes {allowed}: convert it first"),
    ))
}

/// Converts a JSON value to the natural Python object (an int stays an int).
pub fn from_json<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(from_json(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, from_json(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// Reads `tags` (a dict of str to str, or None) into pairs, refusing other types with the tag's name.
pub fn tags_from_py(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    let py = obj.py();
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| payload_error_in(py, "Tags", "tags must be a dict of str to str"))?;
    let mut tags = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        let Ok(key) = key.cast::<PyString>() else {
            return Err(payload_error_in(
                py,
                "Tags",
                &format!("tag name {key} is not a str"),
            ));
        };
        let name = key.to_str()?;
        let Ok(value) = value.cast::<PyString>() else {
            let kind = value.get_type().name()?;
            return Err(payload_error_in(
                py,
                &format!("Tags.{name}"),
                &format!(
                    "tag {name:?} has type {kind}; tag values are strings: convert it with str()"
                ),
            ));
        };
        if name.is_empty() {
            return Err(payload_error_in(py, "Tags", "a tag name is empty"));
        }
        tags.push((name.to_owned(), value.to_str()?.to_owned()));
    }
    Ok(tags)
}

/// Tag pairs as a new `dict`.
pub fn tags_to_py<'py>(py: Python<'py>, tags: &[(String, String)]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, value) in tags {
        dict.set_item(name, value)?;
    }
    Ok(dict)
}

/// A payload given as `bytes` (borrowed, not copied), `bytearray`, `memoryview` or `str`.
pub fn payload_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(bytes) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(bytes.as_bytes()));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(Cow::Borrowed(text.to_str()?.as_bytes()));
    }
    if obj.is_instance_of::<PyByteArray>() || obj.hasattr("tobytes")? {
        let bytes = obj.py().get_type::<PyBytes>().call1((obj,))?;
        return Ok(Cow::Owned(bytes.cast::<PyBytes>()?.as_bytes().to_vec()));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "payload must be bytes or str, not {}",
        obj.get_type().name()?
    )))
}

/// Nanoseconds of a `datetime` argument, or now when it is `None`.
pub fn nanos_or_now(obj: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<i64> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(timestamp::now_nanos()),
        Some(obj) if is_datetime(obj)? => datetime_to_nanos(obj, field, Naive::Utc),
        Some(obj) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{field} must be a datetime or None, not {}",
            obj.get_type().name()?
        ))),
    }
}

/// The `naive=` argument: what a datetime without a time zone means.
pub fn naive_option(text: &str) -> PyResult<Naive> {
    Naive::parse(text).ok_or_else(|| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "naive must be \"refuse\", \"utc\" or \"local\", not {text:?}"
        ))
    })
}

/// A timeout in seconds from Python: negative or NaN is none at all, and infinity (or anything past a
/// year) is a year, so that adding it to a clock cannot overflow.
pub fn seconds(timeout: f64) -> std::time::Duration {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    if timeout.is_nan() || timeout <= 0.0 {
        std::time::Duration::ZERO
    } else {
        std::time::Duration::from_secs_f64(timeout.min(YEAR))
    }
}
