//! The errors of a session, each with the words a user needs to act on it.

use super::config::AccountKind;
use std::fmt;

pub use crate::scope::Action;
use crate::topic::TopicError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The broker could not be reached, or the connection broke (TLS, DNS, refused, WebSocket).
    Connect(String),
    /// The broker refused the credentials.
    Authentication { username: String, reason: String },
    /// A subscribe or publish outside the account's scope.
    Authorization {
        action: Action,
        topic: String,
        account: String,
        kind: AccountKind,
        how: String,
    },
    /// An operation did not finish in time.
    Timeout(String),
    /// The offline queue was full (policy `raise`), or the message was dropped from it (`drop_oldest`).
    QueueFull(String),
    /// A message over the packet size limit: never sent.
    TooLarge(String),
    /// A subscribe or publish outside the account's scope, refused before anything was sent.
    OutOfScope(TopicError),
    /// The session was closed.
    Closed,
    /// A subscription ended (closed, or refused) while its client goes on: its filter.
    Ended(String),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Connect(reason) => f.write_str(reason),
            SessionError::Authentication { username, reason } => write!(
                f,
                "the broker refused the credentials of {username:?} ({reason}); check the username and \
                 password, or fetch a fresh token"
            ),
            SessionError::Authorization {
                action,
                topic,
                account,
                kind,
                how,
            } => {
                let verb = match action {
                    Action::Subscribe => "subscribe to",
                    Action::Publish => "publish to",
                };
                let who = match kind {
                    AccountKind::User => format!("user account {account:?}"),
                    AccountKind::Source => format!("source account {account:?}"),
                    AccountKind::Unknown => format!("account {account:?}"),
                };
                write!(
                    f,
                    "not authorized to {verb} {topic:?} as {who} ({how}): {}",
                    crate::scope::rule(*kind)
                )
            }
            SessionError::Timeout(what)
            | SessionError::QueueFull(what)
            | SessionError::TooLarge(what) => f.write_str(what),
            SessionError::OutOfScope(err) => err.fmt(f),
            SessionError::Closed => f.write_str("the client is closed"),
            SessionError::Ended(filter) => write!(
                f,
                "the subscription to {filter:?} has ended (it was closed or refused); subscribe again to go on"
            ),
        }
    }
}

impl std::error::Error for SessionError {}
