//! A subscription's data points as one Arrow batch (`Subscription.batch()` in both call styles):
//! up to `max_rows`, taken from the queue in chunks, within a time limit; the malformed messages
//! met on the way are handed over beside it.

use super::{Item, Queue, SessionError};
use crate::columnar::{BatchBuilder, BatchOptions};
use arrow_array::RecordBatch;
use std::time::Duration;

/// How long a batch waits for more rows after the first one arrives, to take them in chunks.
const LINGER: Duration = Duration::from_millis(2);

/// What a batch took: the rows, and the messages that could not be decoded.
#[derive(Debug)]
pub struct Collected {
    pub batch: RecordBatch,
    pub malformed: Vec<Item>,
}

/// Why a batch could not be had.
#[derive(Debug)]
pub enum CollectError {
    /// The subscription failed (before any row of this batch).
    Failed(SessionError),
    /// The subscription delivers plain messages or commands, not data points.
    NotPoints,
    /// The subscription ended and nothing was left.
    Ended,
    /// Arrow refused the rows (a bug: the builder makes them consistent).
    Arrow(String),
}

/// Takes up to `max_rows` data points from `queue` as one batch, waiting up to `within` in all
/// (forever with None); an empty batch when nothing came in time. A failure after some rows ends
/// the batch and is left in the queue for the next call.
///
/// # Errors
/// See `CollectError`.
pub async fn collect(
    queue: &Queue<Item>,
    max_rows: usize,
    within: Option<Duration>,
    options: BatchOptions,
) -> Result<Collected, CollectError> {
    let max_rows = max_rows.max(1);
    let deadline = within.map(|w| tokio::time::Instant::now() + w);
    let mut builder = BatchBuilder::new(options, max_rows.min(65_536));
    let mut malformed = Vec::new();
    let mut closed = false;
    while builder.len() < max_rows {
        let items = queue.drain(max_rows - builder.len());
        if items.is_empty() {
            if queue.is_closed() && queue.is_empty() {
                closed = true;
                break;
            }
            let wanted = (max_rows - builder.len()).min(4096);
            if !queue.chunk(wanted, LINGER, deadline).await {
                if queue.is_closed() && queue.is_empty() {
                    closed = true;
                }
                break;
            }
            continue;
        }
        let mut items = items.into_iter();
        let mut stop = None;
        while let Some(item) = items.next() {
            match item {
                Item::Point { point, .. } => builder.push(&point),
                other @ Item::Malformed { .. } => malformed.push(other),
                Item::Error(err) => {
                    put_back(queue, items);
                    stop = Some(CollectError::Failed(err));
                    break;
                }
                other @ (Item::Command { .. } | Item::Message(_)) => {
                    put_back(queue, std::iter::once(other).chain(items));
                    stop = Some(CollectError::NotPoints);
                    break;
                }
            }
        }
        match stop {
            None => {}
            // Nothing taken yet: the error is this call's.
            Some(err) if builder.is_empty() && malformed.is_empty() => return Err(err),
            // Rows first: the error waits for the next call (a plain message stays queued).
            Some(CollectError::Failed(err)) => {
                queue.push_front(Item::Error(err));
                break;
            }
            Some(_) => break,
        }
    }
    if closed && builder.is_empty() && malformed.is_empty() {
        return Err(CollectError::Ended);
    }
    let batch = builder
        .finish()
        .map_err(|e| CollectError::Arrow(format!("building the Arrow batch failed: {e}")))?;
    Ok(Collected { batch, malformed })
}

/// Puts items back at the front of the queue, in their order.
fn put_back(queue: &Queue<Item>, items: impl Iterator<Item = Item>) {
    let items: Vec<Item> = items.collect();
    for item in items.into_iter().rev() {
        queue.push_front(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{runtime, Message, Overflow, Pop};
    use arrow_array::cast::AsArray;
    use bytes::Bytes;

    fn point(value: i64) -> Item {
        let payload = format!(r#"{{"Value": {value}, "UtcTimestamp": 1731061326260}}"#);
        Item::Point {
            point: crate::payload::parse_raw("v1/raw/Acme/s/C/M/K", payload.as_bytes(), 0).unwrap(),
            qos: 1,
            retain: false,
        }
    }

    fn message() -> Message {
        Message {
            topic: "v1/raw/Acme/s/C/M/K".to_owned(),
            payload: Bytes::from_static(b"not json"),
            qos: 0,
            retain: false,
            received_at: 0,
        }
    }

    fn queue(items: impl IntoIterator<Item = Item>) -> Queue<Item> {
        let queue = Queue::new(100, Overflow::Block);
        for item in items {
            queue.push_control(item);
        }
        queue
    }

    fn take(
        queue: &Queue<Item>,
        max_rows: usize,
        within: Duration,
    ) -> Result<Collected, CollectError> {
        runtime().block_on(collect(
            queue,
            max_rows,
            Some(within),
            BatchOptions::default(),
        ))
    }

    #[test]
    fn rows_up_to_the_limit_and_the_malformed_beside_them() {
        let q = queue([
            point(1),
            Item::Malformed {
                message: message(),
                reason: "not JSON".to_owned(),
            },
            point(2),
            point(3),
        ]);
        let got = take(&q, 2, Duration::from_secs(1)).unwrap();
        assert_eq!(got.batch.num_rows(), 2);
        assert_eq!(got.malformed.len(), 1);
        assert_eq!(q.len(), 1, "the third row waits for the next batch");
    }

    #[test]
    fn nothing_in_time_is_an_empty_batch_and_an_ended_queue_an_error() {
        let q = queue([]);
        let started = std::time::Instant::now();
        assert_eq!(
            take(&q, 10, Duration::from_millis(30))
                .unwrap()
                .batch
                .num_rows(),
            0
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
        q.close();
        assert!(matches!(
            take(&q, 10, Duration::from_secs(5)),
            Err(CollectError::Ended)
        ));
    }

    #[test]
    fn a_failure_after_rows_waits_for_the_next_call() {
        let q = queue([point(1), Item::Error(SessionError::Closed), point(2)]);
        assert_eq!(
            take(&q, 10, Duration::from_secs(1))
                .unwrap()
                .batch
                .num_rows(),
            1
        );
        assert!(matches!(
            take(&q, 10, Duration::from_secs(1)),
            Err(CollectError::Failed(SessionError::Closed))
        ));
        assert_eq!(
            take(&q, 10, Duration::from_secs(1))
                .unwrap()
                .batch
                .num_rows(),
            1
        );
    }

    #[test]
    fn plain_messages_are_refused_and_kept() {
        let q = queue([Item::Message(message())]);
        assert!(matches!(
            take(&q, 10, Duration::from_secs(1)),
            Err(CollectError::NotPoints)
        ));
        assert_eq!(q.len(), 1);
        // Rows before a plain message are given; it and what follows stay queued, in order.
        let q = queue([point(1), Item::Message(message()), point(2), point(3)]);
        assert_eq!(
            take(&q, 10, Duration::from_secs(1))
                .unwrap()
                .batch
                .num_rows(),
            1
        );
        assert!(matches!(q.try_pop(), Pop::Item(Item::Message(_))));
        let rest = take(&q, 10, Duration::from_millis(50)).unwrap().batch;
        let values = rest.column_by_name("value").unwrap();
        let shown: Vec<Option<f64>> = values
            .as_primitive::<arrow_array::types::Float64Type>()
            .iter()
            .collect();
        assert_eq!(shown, [Some(2.0), Some(3.0)]);
    }

    #[test]
    fn rows_arriving_later_are_taken_in_chunks() {
        let q = std::sync::Arc::new(queue([]));
        let producer = {
            let q = std::sync::Arc::clone(&q);
            std::thread::spawn(move || {
                for i in 0..50 {
                    q.push_control(point(i));
                }
            })
        };
        let mut rows = 0;
        while rows < 50 {
            rows += take(&q, 50, Duration::from_secs(5))
                .unwrap()
                .batch
                .num_rows();
        }
        producer.join().unwrap();
        assert_eq!(rows, 50);
    }
}
