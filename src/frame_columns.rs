//! A frame's columns in the few Arrow types a payload is written from: `Int64`, `UInt64`,
//! `Float64`, `Boolean`, `Utf8` and `Timestamp(Nanosecond, zone)`.
//!
//! These are the only conversions `push_frame` needs, written out for the types pandas, Polars and
//! pyarrow produce. Arrow's general `cast` kernel would do them too, but it brings every conversion
//! between every pair of Arrow types (decimals, lists, dictionaries of anything), which was about a
//! third of the extension's size.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, ArrowPrimitiveType, PrimitiveArray, StringArray};
use arrow_schema::{DataType, TimeUnit};
use std::sync::Arc;

/// What a column becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Int64,
    UInt64,
    Float64,
    Boolean,
    /// Text columns (`Utf8`, `LargeUtf8`, `Utf8View`, dictionaries of these, as Polars'
    /// categoricals are) as `Utf8`.
    Text,
    /// A tag: text as it is, and numbers and booleans written as text.
    TagText,
    /// Timestamps of any unit as nanoseconds, keeping the zone.
    Nanoseconds,
}

/// Why a column cannot become its target (the caller names the column).
pub type Refusal = String;

fn widen<T, O>(column: &dyn Array, op: impl Fn(T::Native) -> O::Native) -> ArrayRef
where
    T: ArrowPrimitiveType,
    O: ArrowPrimitiveType,
{
    Arc::new(column.as_primitive::<T>().unary::<_, O>(op))
}

fn nanoseconds<T: ArrowPrimitiveType<Native = i64>>(
    column: &dyn Array,
    per_unit: i64,
    zone: Option<Arc<str>>,
) -> Result<ArrayRef, Refusal> {
    let nanos: PrimitiveArray<TimestampNanosecondType> = column
        .as_primitive::<T>()
        .try_unary(|v| {
            v.checked_mul(per_unit).ok_or_else(|| {
                format!("the timestamp {v} (in units of {per_unit} ns) is outside the years 1677 to 2262, which nanoseconds cover")
            })
        })?;
    Ok(Arc::new(nanos.with_timezone_opt(zone)))
}

fn text_of<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

/// Whether a column of `data_type` holds text (the values of a text dictionary included).
pub fn is_text(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, value) => {
            matches!(
                **value,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            )
        }
        _ => false,
    }
}

/// A dictionary column's rows as text, given its dictionary's values as text.
fn dictionary_text(column: &dyn Array, values: &StringArray) -> ArrayRef {
    let dictionary = column.as_any_dictionary();
    if values.is_empty() {
        // No values, so every key is null (pandas: a categorical of missing values). Arrow's
        // normalized_keys() asserts a non-empty dictionary.
        return Arc::new(StringArray::new_null(column.len()));
    }
    let keys = dictionary.keys();
    text_of(
        dictionary
            .normalized_keys()
            .iter()
            .enumerate()
            .map(|(row, &i)| {
                if keys.is_null(row) || values.is_null(i) {
                    None
                } else {
                    Some(values.value(i))
                }
            }),
    )
}

/// Text columns as `Utf8`, or None for a column that holds no text.
fn text(column: &dyn Array) -> Option<ArrayRef> {
    Some(match column.data_type() {
        DataType::Utf8 => Arc::new(column.as_string::<i32>().clone()),
        DataType::LargeUtf8 => text_of(column.as_string::<i64>().iter()),
        DataType::Utf8View => text_of(column.as_string_view().iter()),
        DataType::Dictionary(_, value)
            if matches!(
                **value,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            let values = text(column.as_any_dictionary().values().as_ref())?;
            dictionary_text(column, values.as_string::<i32>())
        }
        _ => return None,
    })
}

fn written<T, V>(column: &dyn Array, show: impl Fn(V) -> Option<String>) -> ArrayRef
where
    T: ArrowPrimitiveType<Native = V>,
{
    Arc::new(
        column
            .as_primitive::<T>()
            .iter()
            .map(|v| v.and_then(&show))
            .collect::<StringArray>(),
    )
}

/// A float as a tag's text: the shortest text that reads back as the same number (in the column's
/// own width, so that a float32 0.1 is "0.1"); NaN is no value.
fn float_text<V: serde::Serialize + Into<f64> + Copy>(value: V) -> Option<String> {
    let wide: f64 = value.into();
    if wide.is_nan() {
        None
    } else if wide.is_infinite() {
        Some(if wide > 0.0 { "inf" } else { "-inf" }.to_owned())
    } else {
        serde_json::to_string(&value).ok()
    }
}

/// Numbers and booleans written as text, for a tag.
fn tag_text(column: &dyn Array) -> Option<ArrayRef> {
    // The shape `written` takes, shared with floats; integers are Copy.
    #[allow(clippy::unnecessary_wraps, clippy::needless_pass_by_value)]
    fn int<V: ToString>(v: V) -> Option<String> {
        Some(v.to_string())
    }
    Some(match column.data_type() {
        DataType::Int8 => written::<Int8Type, _>(column, int),
        DataType::Int16 => written::<Int16Type, _>(column, int),
        DataType::Int32 => written::<Int32Type, _>(column, int),
        DataType::Int64 => written::<Int64Type, _>(column, int),
        DataType::UInt8 => written::<UInt8Type, _>(column, int),
        DataType::UInt16 => written::<UInt16Type, _>(column, int),
        DataType::UInt32 => written::<UInt32Type, _>(column, int),
        DataType::UInt64 => written::<UInt64Type, _>(column, int),
        DataType::Float16 => written::<Float16Type, _>(column, |v| float_text(v.to_f32())),
        DataType::Float32 => written::<Float32Type, _>(column, float_text),
        DataType::Float64 => written::<Float64Type, _>(column, float_text),
        DataType::Boolean => Arc::new(
            column
                .as_boolean()
                .iter()
                .map(|v| v.map(|b| if b { "true" } else { "false" }))
                .collect::<StringArray>(),
        ),
        // A column of missing values only (pandas and Polars give an all-None column this type).
        DataType::Null => Arc::new(StringArray::new_null(column.len())),
        // A categorical of numbers, say: its values as text, by key.
        DataType::Dictionary(_, _) => {
            let values = tag_text(column.as_any_dictionary().values().as_ref())?;
            dictionary_text(column, values.as_string::<i32>())
        }
        _ => return text(column),
    })
}

/// `column` as `target`, or why it cannot be.
pub fn convert(column: &ArrayRef, target: Target) -> Result<ArrayRef, Refusal> {
    let data_type = column.data_type();
    let refused = || -> Refusal { format!("cannot be read as {target:?} from {data_type}") };
    let c = column.as_ref();
    match (target, data_type) {
        (Target::Int64, DataType::Int8) => Ok(widen::<Int8Type, Int64Type>(c, i64::from)),
        (Target::Int64, DataType::Int16) => Ok(widen::<Int16Type, Int64Type>(c, i64::from)),
        (Target::Int64, DataType::Int32) => Ok(widen::<Int32Type, Int64Type>(c, i64::from)),
        (Target::UInt64, DataType::UInt8) => Ok(widen::<UInt8Type, UInt64Type>(c, u64::from)),
        (Target::UInt64, DataType::UInt16) => Ok(widen::<UInt16Type, UInt64Type>(c, u64::from)),
        (Target::UInt64, DataType::UInt32) => Ok(widen::<UInt32Type, UInt64Type>(c, u64::from)),
        (Target::Float64, DataType::Float16) => {
            {
            #[allow(clippy::redundant_closure_for_method_calls)] // f16 is not nameable without the half crate
            Ok(widen::<Float16Type, Float64Type>(c, |v| v.to_f64()))
        }
        }
        (Target::Float64, DataType::Float32) => {
            Ok(widen::<Float32Type, Float64Type>(c, f64::from))
        }
        (Target::Int64, DataType::Int64)
        | (Target::UInt64, DataType::UInt64)
        | (Target::Float64, DataType::Float64)
        | (Target::Boolean, DataType::Boolean)
        | (Target::Nanoseconds, DataType::Timestamp(TimeUnit::Nanosecond, _)) => {
            Ok(Arc::clone(column))
        }
        (Target::Nanoseconds, DataType::Timestamp(unit, zone)) => match unit {
            TimeUnit::Second => nanoseconds::<TimestampSecondType>(c, 1_000_000_000, zone.clone()),
            TimeUnit::Millisecond => {
                nanoseconds::<TimestampMillisecondType>(c, 1_000_000, zone.clone())
            }
            TimeUnit::Microsecond => {
                nanoseconds::<TimestampMicrosecondType>(c, 1_000, zone.clone())
            }
            TimeUnit::Nanosecond => unreachable!("matched above"),
        },
        (Target::Text, _) => text(c).ok_or_else(refused),
        (Target::TagText, _) => tag_text(c).ok_or_else(|| {
            format!("a tag column must hold text, numbers or booleans, not {data_type}: convert the column first")
        }),
        _ => Err(refused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::StringDictionaryBuilder;
    use arrow_array::{
        BooleanArray, Float16Array, Float32Array, Int16Array, Int64Array, LargeStringArray,
        StringViewArray, TimestampMicrosecondArray, TimestampSecondArray, UInt8Array,
    };

    fn strings(array: &ArrayRef) -> Vec<Option<String>> {
        array
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect()
    }

    fn some(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some((*v).to_owned())).collect()
    }

    #[test]
    fn integers_and_floats_widen_keeping_nulls() {
        let ints: ArrayRef = Arc::new(Int16Array::from(vec![Some(-3), None, Some(7)]));
        let wide = convert(&ints, Target::Int64).unwrap();
        assert_eq!(
            wide.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(),
            [Some(-3), None, Some(7)]
        );
        let small: ArrayRef = Arc::new(UInt8Array::from(vec![255]));
        assert_eq!(
            convert(&small, Target::UInt64)
                .unwrap()
                .as_primitive::<UInt64Type>()
                .value(0),
            255
        );
        let halves: ArrayRef = Arc::new(Float16Array::from(vec![half_of(1.5)]));
        assert!(
            (convert(&halves, Target::Float64)
                .unwrap()
                .as_primitive::<Float64Type>()
                .value(0)
                - 1.5)
                .abs()
                < f64::EPSILON
        );
        assert!(convert(&ints, Target::Float64).is_err());
        assert!(convert(&ints, Target::Boolean).is_err());
    }

    fn half_of(v: f32) -> <Float16Type as ArrowPrimitiveType>::Native {
        <Float16Type as ArrowPrimitiveType>::Native::from_f32(v)
    }

    #[test]
    fn timestamps_become_nanoseconds_with_their_zone() {
        let seconds: ArrayRef = Arc::new(
            TimestampSecondArray::from(vec![Some(1_731_061_326), None]).with_timezone("UTC"),
        );
        let nanos = convert(&seconds, Target::Nanoseconds).unwrap();
        assert_eq!(
            nanos.data_type(),
            &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
        );
        let values = nanos.as_primitive::<TimestampNanosecondType>();
        assert_eq!(values.value(0), 1_731_061_326_000_000_000);
        assert!(values.is_null(1));
        let micros: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![5]));
        assert_eq!(
            convert(&micros, Target::Nanoseconds).unwrap().data_type(),
            &DataType::Timestamp(TimeUnit::Nanosecond, None)
        );
        // Beyond 2262 nanoseconds overflow: refused, not turned into a missing timestamp.
        let far: ArrayRef = Arc::new(TimestampSecondArray::from(vec![i64::MAX / 10]));
        assert!(convert(&far, Target::Nanoseconds)
            .unwrap_err()
            .contains("1677 to 2262"));
    }

    #[test]
    fn every_kind_of_text_column_becomes_utf8() {
        let large: ArrayRef = Arc::new(LargeStringArray::from(vec![Some("a"), None]));
        assert_eq!(
            strings(&convert(&large, Target::Text).unwrap()),
            [Some("a".to_owned()), None]
        );
        let view: ArrayRef = Arc::new(StringViewArray::from(vec![
            Some("a long text of more than twelve bytes"),
            None,
        ]));
        assert_eq!(
            strings(&convert(&view, Target::Text).unwrap()),
            [
                Some("a long text of more than twelve bytes".to_owned()),
                None
            ]
        );
        let mut dictionary = StringDictionaryBuilder::<Int8Type>::new();
        dictionary.append_value("M1");
        dictionary.append_null();
        dictionary.append_value("M2");
        dictionary.append_value("M1");
        let dictionary: ArrayRef = Arc::new(dictionary.finish());
        assert_eq!(
            strings(&convert(&dictionary, Target::Text).unwrap()),
            [
                Some("M1".to_owned()),
                None,
                Some("M2".to_owned()),
                Some("M1".to_owned())
            ]
        );
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        assert!(convert(&ints, Target::Text).is_err());
        // Polars' categoricals: a dictionary of string views.
        let views: ArrayRef = Arc::new(StringViewArray::from(vec!["L1", "L2"]));
        let categorical: ArrayRef = Arc::new(
            arrow_array::DictionaryArray::<arrow_array::types::UInt32Type>::try_new(
                arrow_array::UInt32Array::from(vec![Some(1), None, Some(0)]),
                views,
            )
            .unwrap(),
        );
        assert!(is_text(categorical.data_type()));
        assert_eq!(
            strings(&convert(&categorical, Target::TagText).unwrap()),
            [Some("L2".to_owned()), None, Some("L1".to_owned())]
        );
    }

    #[test]
    fn tags_write_numbers_and_booleans_as_text() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(-4), None]));
        assert_eq!(
            strings(&convert(&ints, Target::TagText).unwrap()),
            [Some("-4".to_owned()), None]
        );
        let floats: ArrayRef = Arc::new(Float32Array::from(vec![
            0.1,
            1.0,
            f32::NAN,
            f32::NEG_INFINITY,
        ]));
        assert_eq!(
            strings(&convert(&floats, Target::TagText).unwrap()),
            [
                Some("0.1".to_owned()),
                Some("1.0".to_owned()),
                None,
                Some("-inf".to_owned())
            ]
        );
        let flags: ArrayRef = Arc::new(BooleanArray::from(vec![true, false]));
        assert_eq!(
            strings(&convert(&flags, Target::TagText).unwrap()),
            some(&["true", "false"])
        );
        let missing: ArrayRef = Arc::new(arrow_array::NullArray::new(2));
        assert_eq!(
            strings(&convert(&missing, Target::TagText).unwrap()),
            [None, None]
        );
        // A categorical of numbers, and one whose categories are all unused (an empty dictionary).
        let lines: ArrayRef = Arc::new(
            arrow_array::DictionaryArray::<Int8Type>::try_new(
                arrow_array::Int8Array::from(vec![Some(1), None, Some(0)]),
                Arc::new(Int64Array::from(vec![7, 9])),
            )
            .unwrap(),
        );
        assert_eq!(
            strings(&convert(&lines, Target::TagText).unwrap()),
            [Some("9".to_owned()), None, Some("7".to_owned())]
        );
        let unused: ArrayRef = Arc::new(
            arrow_array::DictionaryArray::<Int8Type>::try_new(
                arrow_array::Int8Array::from(vec![None, None]),
                Arc::new(StringArray::from(Vec::<&str>::new())),
            )
            .unwrap(),
        );
        assert_eq!(
            strings(&convert(&unused, Target::TagText).unwrap()),
            [None, None]
        );
        assert_eq!(
            strings(&convert(&unused, Target::Text).unwrap()),
            [None, None]
        );
        let times: ArrayRef = Arc::new(TimestampSecondArray::from(vec![1]));
        assert!(convert(&times, Target::TagText)
            .unwrap_err()
            .contains("convert the column first"));
    }
}
