//! Data points into Arrow record batches: one row per point, built column by column in Rust so that
//! Python never loops over points to make a DataFrame.
//!
//! Columns: `timestamp` and `received_at` (UTC, nanoseconds), `company`, `source_id`,
//! `connection_tag`, `measurement`, `key`, `value` (float64: numbers, and booleans as 1.0/0.0),
//! `value_text` (strings; lists and objects as JSON text; null for numbers and booleans),
//! `value_type` (what the JSON value was: `int`, `float`, `bool`, `string`, `json` or `null`, so that
//! a frame can give each key its natural dtype), `tags` (a map of string to string), and one string
//! column per tag asked for in `tag_columns`.

use crate::payload::RawPoint;
use arrow_array::builder::{Float64Builder, MapBuilder, StringBuilder, TimestampNanosecondBuilder};
use arrow_array::types::Int8Type;
use arrow_array::{
    Array, ArrayRef, DictionaryArray, Int8Array, MapArray, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::Value;
use std::sync::Arc;

/// How to shape a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOptions {
    /// Tags to copy into columns of their own (named after the tag), besides the `tags` map.
    pub tag_columns: Vec<String>,
}

fn utc_timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The kinds of JSON value in the `value_type` column, by their dictionary key.
pub const VALUE_TYPES: [&str; 6] = ["int", "float", "bool", "string", "json", "null"];

/// The one dictionary of every `value_type` column: batches that share it concatenate without
/// repeating it (pandas refuses a categorical with repeated categories).
fn value_type_names() -> ArrayRef {
    static NAMES: std::sync::OnceLock<ArrayRef> = std::sync::OnceLock::new();
    Arc::clone(NAMES.get_or_init(|| Arc::new(StringArray::from(VALUE_TYPES.to_vec()))))
}

fn value_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8))
}

/// The dictionary key of a JSON value's kind in `VALUE_TYPES`.
fn kind_of(value: &Value) -> i8 {
    match value {
        Value::Number(n) if n.is_f64() => 1,
        Value::Number(_) => 0,
        Value::Bool(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) | Value::Object(_) => 4,
        Value::Null => 5,
    }
}

/// The schema of batches built with `options`.
pub fn schema(options: &BatchOptions) -> SchemaRef {
    let entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("keys", DataType::Utf8, false),
                Field::new("values", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    let mut fields = vec![
        Field::new("timestamp", utc_timestamp(), false),
        Field::new("received_at", utc_timestamp(), false),
        Field::new("company", DataType::Utf8, false),
        Field::new("source_id", DataType::Utf8, false),
        Field::new("connection_tag", DataType::Utf8, false),
        Field::new("measurement", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("value_text", DataType::Utf8, true),
        Field::new("value_type", value_type(), false),
        Field::new("tags", DataType::Map(Arc::new(entries), false), false),
    ];
    for tag in &options.tag_columns {
        fields.push(Field::new(tag, DataType::Utf8, true));
    }
    Arc::new(Schema::new(fields))
}

/// Appends points one at a time; `finish` makes the record batch.
pub struct BatchBuilder {
    options: BatchOptions,
    timestamp: TimestampNanosecondBuilder,
    received_at: TimestampNanosecondBuilder,
    company: StringBuilder,
    source_id: StringBuilder,
    connection_tag: StringBuilder,
    measurement: StringBuilder,
    key: StringBuilder,
    value: Float64Builder,
    value_text: StringBuilder,
    value_type: Vec<i8>,
    tags: MapBuilder<StringBuilder, StringBuilder>,
    tag_columns: Vec<StringBuilder>,
    rows: usize,
}

impl BatchBuilder {
    pub fn new(options: BatchOptions, capacity: usize) -> Self {
        let text = || StringBuilder::with_capacity(capacity, capacity * 16);
        let tag_columns = options.tag_columns.iter().map(|_| text()).collect();
        BatchBuilder {
            timestamp: TimestampNanosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            received_at: TimestampNanosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            company: text(),
            source_id: text(),
            connection_tag: text(),
            measurement: text(),
            key: text(),
            value: Float64Builder::with_capacity(capacity),
            value_text: text(),
            value_type: Vec::with_capacity(capacity),
            tags: MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()),
            tag_columns,
            options,
            rows: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn push(&mut self, point: &RawPoint) {
        self.timestamp.append_value(point.timestamp);
        self.received_at.append_value(point.received_at);
        self.company.append_value(point.topic.company());
        self.source_id.append_value(point.topic.source_id());
        self.connection_tag
            .append_value(point.topic.connection_tag());
        self.measurement.append_value(point.topic.measurement());
        self.key.append_value(point.topic.key());
        self.value_type.push(kind_of(&point.value));
        match &point.value {
            Value::Number(n) => {
                self.value.append_option(n.as_f64());
                self.value_text.append_null();
            }
            Value::Bool(b) => {
                self.value.append_value(if *b { 1.0 } else { 0.0 });
                self.value_text.append_null();
            }
            Value::String(s) => {
                self.value.append_null();
                self.value_text.append_value(s);
            }
            Value::Null => {
                self.value.append_null();
                self.value_text.append_null();
            }
            other @ (Value::Array(_) | Value::Object(_)) => {
                self.value.append_null();
                self.value_text.append_value(other.to_string());
            }
        }
        for (name, value) in &point.tags.0 {
            self.tags.keys().append_value(name);
            self.tags.values().append_value(value);
        }
        // Appending an entry can only fail when the key and value counts differ; they match above.
        let _ = self.tags.append(true);
        for (column, wanted) in self.tag_columns.iter_mut().zip(&self.options.tag_columns) {
            let found = point.tags.0.iter().find(|(name, _)| name == wanted);
            column.append_option(found.map(|(_, value)| value.as_str()));
        }
        self.rows += 1;
    }

    /// The record batch of everything pushed so far; the builder starts again empty.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.timestamp.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.company.finish()),
            Arc::new(self.source_id.finish()),
            Arc::new(self.connection_tag.finish()),
            Arc::new(self.measurement.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.value_text.finish()),
            Arc::new(DictionaryArray::<Int8Type>::try_new(
                Int8Array::from(std::mem::take(&mut self.value_type)),
                value_type_names(),
            )?),
            Arc::new(self.tags.finish()),
        ];
        for column in &mut self.tag_columns {
            columns.push(Arc::new(column.finish()));
        }
        self.rows = 0;
        RecordBatch::try_new(schema(&self.options), columns)
    }
}

/// `batch` with its `tags` map as a struct of one nullable string field per tag name that occurs
/// (sorted by name), null where a row lacks the tag: a cell reads as a dict in pandas
/// (`df.tags[0]["MachineName"]`) and a field as a column (`df.tags.struct.field("MachineName")`).
pub fn tags_to_struct(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let Ok(at) = schema.index_of("tags") else {
        return Ok(batch.clone());
    };
    let Some(map) = batch.column(at).as_any().downcast_ref::<MapArray>() else {
        return Ok(batch.clone());
    };
    let keys = map
        .keys()
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArrowError::SchemaError("tag names must be strings".into()))?;
    let values = map
        .values()
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArrowError::SchemaError("tag values must be strings".into()))?;
    let mut names: Vec<&str> = keys.iter().flatten().collect();
    names.sort_unstable();
    names.dedup();
    let slot: std::collections::HashMap<&str, usize> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let rows = map.len();
    let mut columns: Vec<Vec<Option<&str>>> = vec![vec![None; rows]; names.len()];
    let offsets = map.value_offsets();
    for row in 0..rows {
        #[allow(clippy::cast_sign_loss)] // offsets of a valid array are never negative
        for entry in offsets[row] as usize..offsets[row + 1] as usize {
            if keys.is_null(entry) {
                continue;
            }
            let cell = &mut columns[slot[keys.value(entry)]][row];
            if cell.is_none() && values.is_valid(entry) {
                *cell = Some(values.value(entry));
            }
        }
    }
    let fields: Vec<Field> = names
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, true))
        .collect();
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .map(|c| Arc::new(StringArray::from(c)) as ArrayRef)
        .collect();
    let tags = if fields.is_empty() {
        StructArray::new_empty_fields(rows, None)
    } else {
        StructArray::try_new(fields.into(), arrays, None)?
    };
    let mut new_fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    new_fields[at] = Field::new("tags", tags.data_type().clone(), false);
    let mut new_columns = batch.columns().to_vec();
    new_columns[at] = Arc::new(tags);
    RecordBatch::try_new(Arc::new(Schema::new(new_fields)), new_columns)
}

/// One record batch of `points`.
pub fn build(points: &[RawPoint], options: &BatchOptions) -> Result<RecordBatch, ArrowError> {
    let mut builder = BatchBuilder::new(options.clone(), points.len());
    for point in points {
        builder.push(point);
    }
    builder.finish()
}

/// Joins batches of the same schema into one.
pub fn concat(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    arrow_select::concat::concat_batches(schema, batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::parse_raw;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, TimestampNanosecondType};
    use arrow_array::Array;

    fn point(key: &str, payload: &str) -> RawPoint {
        parse_raw(
            &format!("v1/raw/AcmeCorp/src-1/Conn/Monitoring/{key}"),
            payload.as_bytes(),
            99,
        )
        .unwrap()
    }

    #[test]
    fn every_value_kind_lands_in_the_right_column() {
        let points = vec![
            point(
                "int",
                r#"{"Value": 55, "Tags": {"MachineName": "M1"}, "UtcTimestamp": 1731061326260}"#,
            ),
            point("float", r#"{"Value": 23.5}"#),
            point("bool", r#"{"Value": true}"#),
            point(
                "text",
                r#"{"Value": "Running", "Tags": {"Line": "2", "MachineName": "M2"}}"#,
            ),
            point("list", r#"{"Value": [1, {"a": null}]}"#),
            point("null", r#"{"Value": null}"#),
        ];
        let options = BatchOptions {
            tag_columns: vec!["MachineName".into()],
        };
        let batch = build(&points, &options).unwrap();
        assert_eq!(batch.num_rows(), 6);
        assert_eq!(batch.schema(), schema(&options));
        let value = batch
            .column_by_name("value")
            .unwrap()
            .as_primitive::<Float64Type>();
        // Exact values: these floats are representable, so equality is what is meant.
        assert_eq!(value.values()[..3], [55.0, 23.5, 1.0]);
        assert!(value.is_null(3) && value.is_null(4) && value.is_null(5));
        let text = batch
            .column_by_name("value_text")
            .unwrap()
            .as_string::<i32>();
        assert!(text.is_null(0) && text.is_null(1) && text.is_null(2) && text.is_null(5));
        assert_eq!(text.value(3), "Running");
        assert_eq!(text.value(4), r#"[1,{"a":null}]"#);
        let stamps = batch
            .column_by_name("timestamp")
            .unwrap()
            .as_primitive::<TimestampNanosecondType>();
        assert_eq!(stamps.value(0), 1_731_061_326_260_000_000);
        assert_eq!(stamps.value(1), 99, "no UtcTimestamp: the time of receipt");
        let machine = batch
            .column_by_name("MachineName")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(machine.value(0), "M1");
        assert!(machine.is_null(1));
        assert_eq!(machine.value(3), "M2");
        let tags = batch.column_by_name("tags").unwrap().as_map();
        assert_eq!(tags.value(3).len(), 2);
        let keys = batch.column_by_name("key").unwrap().as_string::<i32>();
        assert_eq!(keys.value(4), "list");
        let kinds = batch
            .column_by_name("value_type")
            .unwrap()
            .as_dictionary::<Int8Type>();
        let named: Vec<&str> = kinds
            .keys()
            .values()
            .iter()
            .map(|k| VALUE_TYPES[usize::try_from(*k).unwrap()])
            .collect();
        assert_eq!(named, ["int", "float", "bool", "string", "json", "null"]);
    }

    #[test]
    fn tags_become_a_struct_with_a_field_per_name() {
        let points = vec![
            point(
                "a",
                r#"{"Value": 1, "Tags": {"MachineName": "M1", "Line": "2"}}"#,
            ),
            point("b", r#"{"Value": 2}"#),
            point("c", r#"{"Value": 3, "Tags": {"MachineName": "M2"}}"#),
        ];
        let batch = build(&points, &BatchOptions::default()).unwrap();
        let shaped = tags_to_struct(&batch).unwrap();
        let tags = shaped.column_by_name("tags").unwrap().as_struct();
        assert_eq!(tags.column_names(), ["Line", "MachineName"]);
        let machine = tags
            .column_by_name("MachineName")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(machine.value(0), "M1");
        assert!(machine.is_null(1));
        assert_eq!(machine.value(2), "M2");
        let line = tags.column_by_name("Line").unwrap().as_string::<i32>();
        assert!(line.is_null(2));
        let empty = build(&[point("b", r#"{"Value": 2}"#)], &BatchOptions::default()).unwrap();
        assert_eq!(tags_to_struct(&empty).unwrap().num_rows(), 1);
    }

    #[test]
    fn concatenated_batches_share_one_value_type_dictionary() {
        let options = BatchOptions::default();
        let a = build(&[point("a", r#"{"Value": 1}"#)], &options).unwrap();
        let b = build(&[point("b", r#"{"Value": "x"}"#)], &options).unwrap();
        let joined = concat(&schema(&options), &[a, b]).unwrap();
        let kinds = joined
            .column_by_name("value_type")
            .unwrap()
            .as_dictionary::<Int8Type>();
        assert_eq!(kinds.values().len(), VALUE_TYPES.len());
        assert_eq!(kinds.keys().values().to_vec(), vec![0, 3]);
    }

    #[test]
    fn concat_joins_batches() {
        let options = BatchOptions::default();
        let a = build(&[point("a", r#"{"Value": 1}"#)], &options).unwrap();
        let b = build(
            &[point("b", r#"{"Value": 2}"#), point("c", r#"{"Value": 3}"#)],
            &options,
        )
        .unwrap();
        let joined = concat(&schema(&options), &[a, b]).unwrap();
        assert_eq!(joined.num_rows(), 3);
        let empty = build(&[], &options).unwrap();
        assert_eq!(empty.num_rows(), 0);
    }
}

/// pandas hands its index over as a column, listed in the schema's "pandas" metadata (or named
/// `__index_level_N__`): a time index is the natural timestamp; other index columns are not fields.
fn pandas_index_columns(schema: &Schema) -> Vec<String> {
    let mut columns: Vec<String> = schema
        .metadata()
        .get("pandas")
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|meta| meta.get("index_columns").cloned())
        .and_then(|columns| columns.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    columns.extend(
        schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n.starts_with("__index_level_")),
    );
    columns
}

/// Turns the rows of record batches into measurement-level push payloads: one message per row, its
/// fields from every column except the timestamp and tag columns.
///
/// Fields: integers, floats, booleans and strings (dictionary-encoded too). A null or a NaN leaves the
/// field out of that row (pandas writes missing values that way); a row with no field left is skipped.
/// Infinities and other column types are errors naming the column. Tags: text, numbers and booleans
/// (dictionary-encoded too), as text; a null or a NaN leaves the tag out, and other column types are
/// errors naming the column. The timestamp: a timestamp column (any unit; without a time zone, as `naive`
/// says: refused by default), epoch milliseconds as integers, or ISO 8601 strings; a null lets
/// Capture stamp the row.
#[derive(Debug)]
pub struct FrameRows {
    fields: Vec<(String, ArrayRef)>,
    tags: Vec<(String, ArrayRef)>,
    timestamp: Option<(String, ArrayRef)>,
    /// How the timestamp column's wall-clock values become instants (a tz-naive column).
    wall_clock: crate::timestamp::Naive,
    rows: usize,
}

fn column_error(column: &str, why: impl std::fmt::Display) -> crate::payload::PayloadError {
    crate::payload::PayloadError::in_field(column, format!("column {column:?}: {why}"))
}

impl FrameRows {
    pub fn new(
        batch: &RecordBatch,
        timestamp_column: Option<&str>,
        tag_columns: &[String],
        naive: crate::timestamp::Naive,
    ) -> Result<FrameRows, crate::payload::PayloadError> {
        use crate::frame_columns::{convert, Target};
        let schema = batch.schema();
        let index_columns = pandas_index_columns(&schema);
        let index_time = schema
            .fields()
            .iter()
            .find(|f| {
                index_columns.contains(f.name())
                    && matches!(f.data_type(), DataType::Timestamp(_, _))
            })
            .map(|f| f.name().clone());
        let timestamp_name = timestamp_column.map(str::to_owned).or(index_time);
        if let Some(name) = &timestamp_name {
            if schema.index_of(name).is_err() {
                return Err(column_error(name, "no such column (timestamp_column)"));
            }
        }
        for tag in tag_columns {
            if schema.index_of(tag).is_err() {
                return Err(column_error(tag, "no such column (tag_columns)"));
            }
        }
        let mut fields = Vec::new();
        let mut tags = Vec::new();
        let mut timestamp = None;
        let mut wall_clock = crate::timestamp::Naive::Utc;
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            let name = field.name();
            if Some(name) == timestamp_name.as_ref() {
                if let DataType::Timestamp(_, None) = field.data_type() {
                    if naive == crate::timestamp::Naive::Refuse {
                        return Err(column_error(
                            name,
                            "its timestamps have no time zone (tz-naive): read as UTC or as local time they \
                             differ by the UTC offset; localize it (pandas: .dt.tz_localize(\"UTC\") or the \
                             zone of the data; Polars: .dt.replace_time_zone(\"UTC\")), or pass naive=\"utc\" \
                             or naive=\"local\"",
                        ));
                    }
                    wall_clock = naive;
                }
                let normalized = match field.data_type() {
                    // The values of an aware column are UTC instants whatever its zone: keep the zone, so
                    // that the cast changes only the unit.
                    DataType::Timestamp(_, _) => convert(column, Target::Nanoseconds),
                    DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => convert(column, Target::Int64),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => convert(column, Target::Text),
                    other => {
                        return Err(column_error(
                            name,
                            format!("a timestamp column must hold timestamps, epoch milliseconds or ISO 8601 text, not {other}"),
                        ))
                    }
                }
                .map_err(|e| column_error(name, e))?;
                timestamp = Some((name.clone(), normalized));
                continue;
            }
            if tag_columns.iter().any(|t| t == name) {
                tags.push((
                    name.clone(),
                    convert(column, Target::TagText).map_err(|e| column_error(name, e))?,
                ));
                continue;
            }
            if index_columns.contains(name) {
                continue;
            }
            let target = match field.data_type() {
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Target::Int64,
                DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => Target::UInt64,
                DataType::Float16 | DataType::Float32 | DataType::Float64 => Target::Float64,
                DataType::Boolean => Target::Boolean,
                text if crate::frame_columns::is_text(text) => Target::Text,
                DataType::Null => continue,
                other => {
                    return Err(column_error(
                        name,
                        format!("Capture stores numbers, strings and booleans, not {other}: convert the column first"),
                    ))
                }
            };
            fields.push((
                name.clone(),
                convert(column, target).map_err(|e| column_error(name, e))?,
            ));
        }
        if fields.is_empty() {
            return Err(crate::payload::PayloadError::in_field(
                "Fields",
                "the frame has no field columns besides the timestamp and tag columns",
            ));
        }
        Ok(FrameRows {
            fields,
            tags,
            timestamp,
            wall_clock,
            rows: batch.num_rows(),
        })
    }

    pub fn len(&self) -> usize {
        self.rows
    }
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The payload of row `row`, or None when the row has no field with a value.
    pub fn payload(&self, row: usize) -> Result<Option<Vec<u8>>, crate::payload::PayloadError> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Float64Type, Int64Type, TimestampNanosecondType, UInt64Type};
        use arrow_array::Array;
        let mut out = Vec::with_capacity(32 + 24 * self.fields.len());
        out.extend_from_slice(b"{\"Fields\":{");
        let mut written = 0;
        for (name, column) in &self.fields {
            if column.is_null(row) {
                continue;
            }
            let mark = out.len();
            if written > 0 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut out, name);
            out.push(b':');
            match column.data_type() {
                DataType::Int64 => out.extend_from_slice(
                    column
                        .as_primitive::<Int64Type>()
                        .value(row)
                        .to_string()
                        .as_bytes(),
                ),
                DataType::UInt64 => out.extend_from_slice(
                    column
                        .as_primitive::<UInt64Type>()
                        .value(row)
                        .to_string()
                        .as_bytes(),
                ),
                DataType::Float64 => {
                    let value = column.as_primitive::<Float64Type>().value(row);
                    if value.is_nan() {
                        out.truncate(mark);
                        continue;
                    }
                    if value.is_infinite() {
                        return Err(column_error(
                            name,
                            format!("row {row} holds {value}, which JSON cannot carry"),
                        ));
                    }
                    let _ = serde_json::to_writer(&mut out, &value);
                }
                DataType::Boolean => {
                    out.extend_from_slice(if column.as_boolean().value(row) {
                        b"true"
                    } else {
                        b"false"
                    });
                }
                _ => {
                    let _ = serde_json::to_writer(&mut out, column.as_string::<i32>().value(row));
                }
            }
            written += 1;
        }
        if written == 0 {
            return Ok(None);
        }
        out.extend_from_slice(b"},\"Tags\":{");
        let mut first = true;
        for (name, column) in &self.tags {
            if column.is_null(row) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            let _ = serde_json::to_writer(&mut out, name);
            out.push(b':');
            let _ = serde_json::to_writer(&mut out, column.as_string::<i32>().value(row));
        }
        out.push(b'}');
        if let Some((name, column)) = &self.timestamp {
            if !column.is_null(row) {
                let nanos = match column.data_type() {
                    DataType::Timestamp(_, _) => {
                        let value = column.as_primitive::<TimestampNanosecondType>().value(row);
                        self.wall_clock.resolve(value).ok_or_else(|| {
                            column_error(name, format!("row {row}: no such local time"))
                        })?
                    }
                    DataType::Int64 => crate::timestamp::check_epoch_ms(
                        column.as_primitive::<Int64Type>().value(row),
                    )
                    .and_then(crate::timestamp::epoch_ms_to_nanos)
                    .map_err(|e| column_error(name, format!("row {row}: {e}")))?,
                    _ => crate::timestamp::parse_iso8601(column.as_string::<i32>().value(row))
                        .map_err(|e| column_error(name, format!("row {row}: {e}")))?,
                };
                out.extend_from_slice(b",\"UtcTimestamp\":\"");
                crate::timestamp::write_iso_millis(&mut out, nanos);
                out.push(b'"');
            }
        }
        out.push(b'}');
        Ok(Some(out))
    }
}

#[cfg(test)]
mod frame_tests {
    use super::*;
    use crate::payload::parse_measurement;
    use crate::timestamp::Naive;
    use arrow_array::{
        BooleanArray, Float64Array, Int32Array, StringArray, TimestampMillisecondArray,
    };
    use serde_json::json;

    fn frame() -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            (
                "time",
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1_731_061_326_260),
                    None,
                ])) as ArrayRef,
            ),
            (
                "Temp",
                Arc::new(Float64Array::from(vec![Some(55.5), Some(f64::NAN)])) as ArrayRef,
            ),
            (
                "Count",
                Arc::new(Int32Array::from(vec![Some(3), None])) as ArrayRef,
            ),
            (
                "On",
                Arc::new(BooleanArray::from(vec![Some(true), Some(false)])) as ArrayRef,
            ),
            (
                "Machine",
                Arc::new(StringArray::from(vec![Some("M1"), None])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn rows_become_measurement_payloads() {
        let rows =
            FrameRows::new(&frame(), Some("time"), &["Machine".to_owned()], Naive::Utc).unwrap();
        assert_eq!(rows.len(), 2);
        let first = parse_measurement(&rows.payload(0).unwrap().unwrap()).unwrap();
        assert_eq!(
            first.fields,
            vec![
                ("Temp".to_owned(), json!(55.5)),
                ("Count".to_owned(), json!(3)),
                ("On".to_owned(), json!(true))
            ]
        );
        assert_eq!(first.tags.0, vec![("Machine".to_owned(), "M1".to_owned())]);
        assert_eq!(
            first.timestamp,
            Some(crate::payload::WireTimestamp::Iso(
                1_731_061_326_260_000_000
            ))
        );
        let second = parse_measurement(&rows.payload(1).unwrap().unwrap()).unwrap();
        assert_eq!(
            second.fields,
            vec![("On".to_owned(), json!(false))],
            "NaN and null are left out"
        );
        assert!(second.tags.0.is_empty());
        assert_eq!(
            second.timestamp, None,
            "a null timestamp lets Capture stamp it"
        );
    }

    #[test]
    fn a_tz_naive_time_column_is_refused_unless_the_caller_says_what_it_means() {
        let err = FrameRows::new(&frame(), Some("time"), &[], Naive::Refuse).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("time"));
        assert!(err.message.contains("naive=\"utc\""), "{}", err.message);
        // An aware column of any zone holds UTC instants: sent as they are.
        let zoned = RecordBatch::try_from_iter(vec![
            (
                "t",
                Arc::new(
                    TimestampMillisecondArray::from(vec![1_731_061_326_260])
                        .with_timezone("America/New_York"),
                ) as ArrayRef,
            ),
            ("V", Arc::new(Int32Array::from(vec![1])) as ArrayRef),
        ])
        .unwrap();
        let rows = FrameRows::new(&zoned, Some("t"), &[], Naive::Refuse).unwrap();
        let sent = parse_measurement(&rows.payload(0).unwrap().unwrap()).unwrap();
        assert_eq!(
            sent.timestamp,
            Some(crate::payload::WireTimestamp::Iso(
                1_731_061_326_260_000_000
            ))
        );
    }

    #[test]
    fn bad_frames_name_the_column() {
        assert!(FrameRows::new(&frame(), Some("nope"), &[], Naive::Refuse)
            .unwrap_err()
            .message
            .contains("\"nope\""));
        let inf = RecordBatch::try_from_iter(vec![(
            "X",
            Arc::new(Float64Array::from(vec![f64::INFINITY])) as ArrayRef,
        )])
        .unwrap();
        let rows = FrameRows::new(&inf, None, &[], Naive::Refuse).unwrap();
        assert_eq!(rows.payload(0).unwrap_err().field.as_deref(), Some("X"));
        let only_time = RecordBatch::try_from_iter(vec![(
            "t",
            Arc::new(TimestampMillisecondArray::from(vec![1])) as ArrayRef,
        )])
        .unwrap();
        assert!(FrameRows::new(&only_time, Some("t"), &[], Naive::Refuse).is_err());
    }
}
