//! `UtcTimestamp` in Capture's payloads: ISO 8601 strings and Unix epoch milliseconds.
//!
//! Times are carried as nanoseconds since the Unix epoch in an `i64` (years 1678 to 2262), enough for the
//! 0 to 9 fractional digits Capture sends and cheap to move into Arrow columns.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

pub const NANOS_PER_MILLI: i64 = 1_000_000;
pub const NANOS_PER_SEC: i64 = 1_000_000_000;

/// Epoch milliseconds accepted when writing: 1973-03-03 up to year 5138. Below this range a value is
/// most likely epoch seconds; above it, microseconds or nanoseconds. Both are mistakes worth an error.
pub const EPOCH_MS_MIN: i64 = 100_000_000_000;
pub const EPOCH_MS_MAX: i64 = 99_999_999_999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampError(pub String);

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimestampError {}

/// The current time in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, count: usize) -> Option<u32> {
        let slice = self.bytes.get(self.pos..self.pos + count)?;
        let mut value = 0u32;
        for &b in slice {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(b - b'0');
        }
        self.pos += count;
        Some(value)
    }
    fn eat(&mut self, byte: u8) -> bool {
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }
}

/// Parses an ISO 8601 date-time into nanoseconds since the epoch.
///
/// Accepts `YYYY-MM-DDTHH:MM[:SS[.fraction]]` with `T`, `t` or a space between date and time, a
/// fraction of any length (digits past the ninth are truncated), and `Z`, `z`, `+HH:MM`, `+HHMM`, `+HH`
/// (or `-`) as the offset. A time without an offset is taken as UTC, since the field is `UtcTimestamp`.
pub fn parse_iso8601(text: &str) -> Result<i64, TimestampError> {
    let bad = |why: &str| {
        TimestampError(format!(
            "{text:?} is not an ISO 8601 timestamp ({why}); expected e.g. \"2024-11-08T10:22:06.26Z\""
        ))
    };
    let mut c = Cursor {
        bytes: text.as_bytes(),
        pos: 0,
    };
    let year = c
        .digits(4)
        .ok_or_else(|| bad("the year must have 4 digits"))?;
    if !c.eat(b'-') {
        return Err(bad("expected '-' after the year"));
    }
    let month = c
        .digits(2)
        .ok_or_else(|| bad("the month must have 2 digits"))?;
    if !c.eat(b'-') {
        return Err(bad("expected '-' after the month"));
    }
    let day = c
        .digits(2)
        .ok_or_else(|| bad("the day must have 2 digits"))?;
    if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
        return Err(bad("expected 'T' between the date and the time"));
    }
    let hour = c
        .digits(2)
        .ok_or_else(|| bad("the hour must have 2 digits"))?;
    if !c.eat(b':') {
        return Err(bad("expected ':' after the hour"));
    }
    let minute = c
        .digits(2)
        .ok_or_else(|| bad("the minutes must have 2 digits"))?;
    let mut second = 0;
    let mut nanos = 0u32;
    if c.eat(b':') {
        second = c
            .digits(2)
            .ok_or_else(|| bad("the seconds must have 2 digits"))?;
        if c.eat(b'.') || c.eat(b',') {
            let mut count = 0;
            while let Some(b) = c.peek().filter(u8::is_ascii_digit) {
                if count < 9 {
                    nanos = nanos * 10 + u32::from(b - b'0');
                }
                count += 1;
                c.pos += 1;
            }
            if count == 0 {
                return Err(bad("a '.' must be followed by digits"));
            }
            for _ in count..9 {
                nanos *= 10;
            }
        }
    }
    let offset_secs = parse_offset(&mut c).map_err(bad)?;
    if c.pos != c.bytes.len() {
        return Err(bad("unexpected characters after the offset"));
    }
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).unwrap_or(0), month, day)
        .ok_or_else(|| bad("the date does not exist"))?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| bad("the time of day is out of range"))?;
    let local = NaiveDateTime::new(date, time)
        .and_utc()
        .timestamp_nanos_opt()
        .ok_or_else(|| bad("it is outside the years 1678 to 2262"))?;
    local
        .checked_sub(offset_secs * NANOS_PER_SEC)
        .ok_or_else(|| bad("it is outside the years 1678 to 2262"))
}

/// Reads `Z`, `+HH:MM`, `+HHMM`, `+HH` (or `-`), or nothing, as seconds east of UTC.
fn parse_offset(c: &mut Cursor<'_>) -> Result<i64, &'static str> {
    match c.peek() {
        None => Ok(0),
        Some(b'Z' | b'z') => {
            c.pos += 1;
            Ok(0)
        }
        Some(sign @ (b'+' | b'-')) => {
            c.pos += 1;
            let hours = c.digits(2).ok_or("the offset hours must have 2 digits")?;
            let minutes = if c.eat(b':') {
                c.digits(2).ok_or("the offset minutes must have 2 digits")?
            } else {
                c.digits(2).unwrap_or(0)
            };
            if hours > 23 || minutes > 59 {
                return Err("the offset is out of range");
            }
            let secs = i64::from(hours * 3600 + minutes * 60);
            Ok(if sign == b'+' { secs } else { -secs })
        }
        Some(_) => Err("unexpected characters after the time"),
    }
}

/// Converts epoch milliseconds (as Capture sends them) to nanoseconds.
pub fn epoch_ms_to_nanos(ms: i64) -> Result<i64, TimestampError> {
    ms.checked_mul(NANOS_PER_MILLI).ok_or_else(|| {
        TimestampError(format!(
            "epoch milliseconds {ms} are outside the years 1678 to 2262"
        ))
    })
}

/// Checks epoch milliseconds a user asked to write, catching seconds or microseconds passed by mistake.
pub fn check_epoch_ms(ms: i64) -> Result<i64, TimestampError> {
    if ms < EPOCH_MS_MIN {
        return Err(TimestampError(format!(
            "{ms} is before 1973 as epoch milliseconds; if it is epoch seconds, multiply by 1000 ({}), or pass a datetime",
            ms.saturating_mul(1000)
        )));
    }
    if ms > EPOCH_MS_MAX {
        return Err(TimestampError(format!(
            "{ms} is after the year 5000 as epoch milliseconds; if it is microseconds or nanoseconds, divide by 1000 or 1000000, or pass a datetime"
        )));
    }
    Ok(ms)
}

/// Splits nanoseconds since the epoch into whole seconds and the nanoseconds within that second.
pub fn split_nanos(nanos: i64) -> (i64, u32) {
    let secs = nanos.div_euclid(NANOS_PER_SEC);
    // rem_euclid of a positive divisor is in 0..1e9, which fits in u32.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let sub = nanos.rem_euclid(NANOS_PER_SEC) as u32;
    (secs, sub)
}

/// What a date-time without a time zone (a naive `datetime`, a tz-naive frame column) means. Python
/// reads a naive datetime as local time and Capture's `UtcTimestamp` is UTC, so guessing either way
/// shifts data by the UTC offset without a word: the default is to refuse, and the caller says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Naive {
    #[default]
    Refuse,
    Utc,
    Local,
}

impl Naive {
    /// `"refuse"`, `"utc"` or `"local"`.
    pub fn parse(text: &str) -> Option<Naive> {
        match text {
            "refuse" => Some(Naive::Refuse),
            "utc" => Some(Naive::Utc),
            "local" => Some(Naive::Local),
            _ => None,
        }
    }

    /// The instant of a wall-clock time given as nanoseconds since the epoch read as UTC; None when
    /// naive times are refused. Under `Local` the machine's time zone (`TZ`, else `/etc/localtime`)
    /// applies: an ambiguous time (the hour repeated when clocks go back) is the earlier one, and a
    /// time that does not exist (skipped when clocks go forward) takes the offset before the change.
    pub fn resolve(self, wall_nanos: i64) -> Option<i64> {
        use chrono::TimeZone;
        match self {
            Naive::Refuse => None,
            Naive::Utc => Some(wall_nanos),
            Naive::Local => {
                let (secs, sub) = split_nanos(wall_nanos);
                let wall = chrono::DateTime::from_timestamp(secs, sub)?.naive_utc();
                let offset = match chrono::Local.from_local_datetime(&wall).earliest() {
                    Some(local) => local.offset().local_minus_utc(),
                    // In a gap: the offset in force an hour earlier, before the clocks changed.
                    None => chrono::Local
                        .from_local_datetime(&(wall - chrono::Duration::hours(1)))
                        .earliest()?
                        .offset()
                        .local_minus_utc(),
                };
                wall_nanos.checked_sub(i64::from(offset) * NANOS_PER_SEC)
            }
        }
    }
}

/// Writes `nanos` as ISO 8601 UTC with millisecond precision: `2024-11-08T10:22:06.260Z`.
pub fn write_iso_millis(out: &mut Vec<u8>, nanos: i64) {
    let (secs, sub) = split_nanos(nanos);
    let dt = chrono::DateTime::from_timestamp(secs, sub)
        .unwrap_or_default()
        .naive_utc();
    let (date, time) = (dt.date(), dt.time());
    let year = date.year();
    let millis = sub / 1_000_000;
    let mut buf = [0u8; 24];
    let mut put = |at: usize, value: u32, width: usize| {
        let mut v = value;
        for i in (0..width).rev() {
            // v % 10 is a single digit.
            #[allow(clippy::cast_possible_truncation)]
            {
                buf[at + i] = b'0' + (v % 10) as u8;
            }
            v /= 10;
        }
    };
    // Years 1678..=2262 only (the i64 range of nanoseconds), always four digits.
    put(0, year.unsigned_abs(), 4);
    put(5, date.month(), 2);
    put(8, date.day(), 2);
    put(11, time.hour(), 2);
    put(14, time.minute(), 2);
    put(17, time.second(), 2);
    put(20, millis, 3);
    buf[4] = b'-';
    buf[7] = b'-';
    buf[10] = b'T';
    buf[13] = b':';
    buf[16] = b':';
    buf[19] = b'.';
    buf[23] = b'Z';
    out.extend_from_slice(&buf);
}

/// `nanos` as an ISO 8601 UTC string with millisecond precision.
pub fn format_iso_millis(nanos: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_iso_millis(&mut out, nanos);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::Naive;

    #[test]
    fn naive_times_are_refused_unless_the_caller_says_what_they_mean() {
        let wall = 1_731_061_326_260_000_000; // 2024-11-08T10:22:06.26 on the wall clock
        assert_eq!(Naive::Refuse.resolve(wall), None);
        assert_eq!(Naive::Utc.resolve(wall), Some(wall));
        assert_eq!(Naive::parse("local"), Some(Naive::Local));
        assert_eq!(Naive::parse("UTC"), None);
        // Local follows the machine's zone: whatever it is, the offset is whole minutes within a day.
        let local = Naive::Local.resolve(wall).unwrap();
        assert_eq!((local - wall) % 60_000_000_000, 0);
        assert!((local - wall).abs() <= 86_400_000_000_000);
    }

    use super::*;

    const EXAMPLE_NANOS: i64 = 1_731_061_326_260_000_000; // 2024-11-08T10:22:06.26Z

    #[test]
    fn capture_example_timestamp() {
        assert_eq!(
            parse_iso8601("2024-11-08T10:22:06.26Z").unwrap(),
            EXAMPLE_NANOS
        );
        assert_eq!(format_iso_millis(EXAMPLE_NANOS), "2024-11-08T10:22:06.260Z");
    }

    #[test]
    fn every_fraction_length_from_0_to_9() {
        let base = 1_731_061_326_000_000_000;
        assert_eq!(parse_iso8601("2024-11-08T10:22:06Z").unwrap(), base);
        let mut text = String::from("2024-11-08T10:22:06.");
        let mut expected_frac = 0i64;
        for digit in 1..=9u8 {
            text.push(char::from(b'0' + digit));
            expected_frac = expected_frac * 10 + i64::from(digit);
            let scaled = expected_frac * 10i64.pow(9 - u32::from(digit));
            assert_eq!(
                parse_iso8601(&format!("{text}Z")).unwrap(),
                base + scaled,
                "{text}"
            );
        }
        // Past nine digits the rest is truncated, not rounded.
        assert_eq!(
            parse_iso8601("2024-11-08T10:22:06.1234567899Z").unwrap(),
            base + 123_456_789
        );
    }

    #[test]
    fn offsets() {
        let utc = parse_iso8601("2024-11-08T10:22:06Z").unwrap();
        assert_eq!(parse_iso8601("2024-11-08T12:22:06+02:00").unwrap(), utc);
        assert_eq!(parse_iso8601("2024-11-08T12:22:06+0200").unwrap(), utc);
        assert_eq!(parse_iso8601("2024-11-08T12:22:06+02").unwrap(), utc);
        assert_eq!(parse_iso8601("2024-11-08T05:52:06-04:30").unwrap(), utc);
        assert_eq!(
            parse_iso8601("2024-11-08T10:22:06").unwrap(),
            utc,
            "no offset is UTC"
        );
        assert_eq!(parse_iso8601("2024-11-08 10:22:06z").unwrap(), utc);
        assert_eq!(
            parse_iso8601("2024-11-08T10:22Z").unwrap(),
            utc - 6 * NANOS_PER_SEC
        );
    }

    #[test]
    fn malformed_timestamps_are_errors() {
        for bad in [
            "",
            "2024",
            "2024-11-08",
            "2024-13-08T10:22:06Z",
            "2024-02-30T10:22:06Z",
            "2024-11-08T25:22:06Z",
            "2024-11-08T10:22:06.Z",
            "2024-11-08T10:22:06Zjunk",
            "2024-11-08T10:22:06+25:00",
            "１２３４-11-08T10:22:06Z",
            "3000-01-01T00:00:00Z",
        ] {
            let err = parse_iso8601(bad).unwrap_err();
            assert!(err.0.contains("ISO 8601"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn epoch_milliseconds() {
        assert_eq!(epoch_ms_to_nanos(1_731_061_326_260).unwrap(), EXAMPLE_NANOS);
        assert!(epoch_ms_to_nanos(i64::MAX).is_err());
        assert!(check_epoch_ms(1_731_061_326)
            .unwrap_err()
            .0
            .contains("epoch seconds"));
        assert!(check_epoch_ms(1_731_061_326_260_000)
            .unwrap_err()
            .0
            .contains("microseconds"));
        assert_eq!(
            check_epoch_ms(1_731_061_326_260).unwrap(),
            1_731_061_326_260
        );
    }

    #[test]
    fn formatting_before_the_epoch_and_truncation() {
        assert_eq!(format_iso_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_iso_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_iso_millis(EXAMPLE_NANOS + 999_999),
            "2024-11-08T10:22:06.260Z"
        );
    }
}
