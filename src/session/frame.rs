//! Publishing a frame: every row of a set of Arrow batches as one measurement-level message to one
//! topic (`push_frame`), in order, through the same outbox and flow control as any publish.

use super::{PublishToken, Session, SessionError};
use crate::columnar::FrameRows;
use crate::payload::PayloadError;
use crate::timestamp::Naive;
use arrow_array::RecordBatch;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;

/// At most this many acknowledgements are awaited at once: memory stays flat for any frame.
const WINDOW: usize = 8192;

/// A frame's rows give way to the connection's other work every this many rows.
const YIELD_EVERY: usize = 1024;

/// How a frame's rows become messages, and how long to wait.
#[derive(Debug, Clone)]
pub struct FrameOptions {
    pub topic: String,
    pub timestamp_column: Option<String>,
    pub tag_columns: Vec<String>,
    pub naive: Naive,
    pub qos: u8,
    /// Wait for the broker's acknowledgements (QoS 1/2); without it, return once all are queued
    /// (a durable outbox holds them).
    pub wait: bool,
    /// How long one row may wait for room in the outbox, and for its acknowledgement.
    pub limit: Duration,
}

/// Why a frame stopped: a row that cannot be a message, or the session's error.
#[derive(Debug)]
pub enum FrameError {
    Payload(PayloadError),
    Session(SessionError),
}

impl From<PayloadError> for FrameError {
    fn from(err: PayloadError) -> Self {
        FrameError::Payload(err)
    }
}

impl From<SessionError> for FrameError {
    fn from(err: SessionError) -> Self {
        FrameError::Session(err)
    }
}

async fn acknowledged(token: PublishToken, limit: Duration) -> Result<(), SessionError> {
    match tokio::time::timeout(limit, token.wait()).await {
        Ok(result) => result,
        Err(_) => Err(SessionError::Timeout(format!(
            "the broker did not acknowledge a row within {:.1} s",
            limit.as_secs_f64()
        ))),
    }
}

impl Session {
    /// Publishes every row of `batches` that holds a value (rows without any are skipped), and
    /// returns how many messages were sent. A row that cannot be a message stops the frame with
    /// its column named; the rows before it are sent.
    ///
    /// # Errors
    /// The first row's `PayloadError`, or the session's error (closed, out of scope, a full
    /// outbox under `offline="raise"`, a timeout).
    pub async fn publish_frame(
        &self,
        batches: &[RecordBatch],
        options: &FrameOptions,
    ) -> Result<usize, FrameError> {
        let FrameOptions {
            topic, qos, limit, ..
        } = options;
        let mut sent = 0usize;
        let mut waiting = VecDeque::new();
        for batch in batches {
            let rows = FrameRows::new(
                batch,
                options.timestamp_column.as_deref(),
                &options.tag_columns,
                options.naive,
            )?;
            for row in 0..rows.len() {
                let Some(payload) = rows.payload(row)? else {
                    continue;
                };
                let payload = Bytes::from(payload);
                let token = match self.try_publish(topic, &payload, *qos, false)? {
                    Some(token) => token,
                    None => {
                        self.publish(topic.clone(), payload, *qos, false, *limit)
                            .await?
                    }
                };
                sent += 1;
                if sent.is_multiple_of(YIELD_EVERY) {
                    // The runtime has one network thread: let acknowledgements, pings and
                    // incoming messages through between chunks of a large frame.
                    tokio::task::yield_now().await;
                }
                if *qos > 0 && options.wait {
                    waiting.push_back(token);
                    while waiting.len() > WINDOW {
                        if let Some(token) = waiting.pop_front() {
                            acknowledged(token, *limit).await?;
                        }
                    }
                }
            }
        }
        for token in waiting {
            acknowledged(token, *limit).await?;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{OfflinePolicy, SessionConfig, Transport};
    use arrow_array::{Float64Array, StringArray};
    use std::sync::Arc;

    fn frame(values: &[Option<f64>]) -> RecordBatch {
        let names: Vec<String> = (0..values.len()).map(|i| format!("m{i}")).collect();
        RecordBatch::try_from_iter([
            (
                "UtcTimestamp",
                Arc::new(StringArray::from(vec![
                    "2024-11-08T10:00:00Z";
                    values.len()
                ])) as _,
            ),
            ("Machine", Arc::new(StringArray::from(names)) as _),
            ("Temp", Arc::new(Float64Array::from(values.to_vec())) as _),
        ])
        .unwrap()
    }

    fn offline_session(max_queued: usize) -> Session {
        // Never connected: every row waits in the offline queue, where the test counts it.
        let mut config = SessionConfig::new("127.0.0.1", Transport::Mqtt);
        config.offline_capacity = max_queued;
        config.offline_policy = OfflinePolicy::Raise;
        Session::new(config, None).unwrap()
    }

    fn options(qos: u8) -> FrameOptions {
        FrameOptions {
            topic: "v1/sources/s/data/read/Conn/Line".to_owned(),
            timestamp_column: Some("UtcTimestamp".to_owned()),
            tag_columns: vec!["Machine".to_owned()],
            naive: Naive::Refuse,
            qos,
            wait: false,
            limit: Duration::from_secs(1),
        }
    }

    impl Session {
        fn queued_payloads(&self) -> Vec<Bytes> {
            self.shared
                .outbox()
                .items
                .iter()
                .map(|p| p.payload.clone())
                .collect()
        }
    }

    #[test]
    fn every_row_with_a_value_is_queued_in_order() {
        let session = offline_session(100);
        let batches = [frame(&[Some(1.0), None, Some(3.0)]), frame(&[Some(4.0)])];
        let sent = crate::session::runtime()
            .block_on(session.publish_frame(&batches, &options(1)))
            .unwrap();
        assert_eq!(sent, 3, "the row without a value is skipped");
        let queued = session.queued_payloads();
        assert_eq!(queued.len(), 3);
        let values: Vec<serde_json::Value> = queued
            .iter()
            .map(|p| {
                serde_json::from_slice::<serde_json::Value>(p).unwrap()["Fields"]["Temp"].clone()
            })
            .collect();
        assert_eq!(values, [1.0, 3.0, 4.0].map(|v| serde_json::json!(v)));
    }

    #[test]
    fn a_full_queue_stops_the_frame_with_the_sessions_error() {
        let session = offline_session(2);
        let batches = [frame(&[Some(1.0), Some(2.0), Some(3.0)])];
        let err = crate::session::runtime()
            .block_on(session.publish_frame(&batches, &options(0)))
            .unwrap_err();
        assert!(
            matches!(err, FrameError::Session(SessionError::QueueFull(_))),
            "{err:?}"
        );
        assert_eq!(
            session.queued_payloads().len(),
            2,
            "the rows before it are kept"
        );
    }

    #[test]
    fn a_bad_timestamp_column_names_the_column() {
        let session = offline_session(10);
        let mut opts = options(0);
        opts.timestamp_column = Some("Nope".to_owned());
        let err = crate::session::runtime()
            .block_on(session.publish_frame(&[frame(&[Some(1.0)])], &opts))
            .unwrap_err();
        let FrameError::Payload(err) = err else {
            panic!("expected a payload error, got {err:?}");
        };
        assert!(err.to_string().contains("Nope"), "{err}");
    }
}
