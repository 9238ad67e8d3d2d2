//! Capture's account scopes: what each kind of account may subscribe to and publish to.
//!
//! Capture's page fixes them: a user account (password, JWT or API token) reads its company's raw
//! tree and writes commands to sources; a source account reads and writes only its own
//! `v1/sources/<SourceID>/...` subtree. The broker disconnects a client that steps outside, and a
//! local broker may just filter or drop: either way the data goes nowhere. The client checks every
//! subscribe and publish against the scope before anything is sent. The rules are written here once;
//! refusals by the broker quote the same text.

use crate::topic::{split_shared, Segment, TopicError};

/// The kind of account, for the scope checks and for error messages that say what it may access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    /// A user account (password, JWT or API token): subscribes to the raw tree, sends commands.
    User,
    /// A source (device) account: only its own `v1/sources/<id>/...` subtree.
    Source,
    /// Not known (a plain MQTT broker).
    Unknown,
}

/// Whether a request is a subscribe or a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
        }
    }
}

/// The scope rule of an account kind, in the words of Capture's MQTT page.
pub fn rule(kind: AccountKind) -> &'static str {
    match kind {
        AccountKind::User => {
            "a user account may subscribe to its company's raw tree (v1/raw/<Company>/..., the company \
             named exactly) and publish commands to v1/sources/<SourceID>/cmd/writedata of its company's sources"
        }
        AccountKind::Source => {
            "a source account can only publish and subscribe within its own v1/sources/<SourceID>/... \
             subtree; it cannot access other sources or the raw tree"
        }
        AccountKind::Unknown => "check the account's access rules (ACL) on the broker",
    }
}

/// What a client may touch, checked before every subscribe and publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// No check (a broker that is not Capture, or an account whose kind is not known).
    #[default]
    Open,
    /// A user account; with its company, the raw tree must be that company's.
    User { company: Option<String> },
    /// A source account and its id.
    Source { source_id: String },
}

/// What the caller says to turn the checks off, quoted in every refusal.
const ESCAPE: &str = "for a broker that is not Capture, pass scope=False";

impl Scope {
    /// The scope of an account of `kind`; `company` and `source_id` narrow it where known.
    pub fn new(kind: AccountKind, company: Option<&str>, source_id: Option<&str>) -> Scope {
        match (kind, source_id) {
            (AccountKind::Source, Some(id)) => Scope::Source {
                source_id: id.to_owned(),
            },
            (AccountKind::User, _) => Scope::User {
                company: company.map(str::to_owned),
            },
            _ => Scope::Open,
        }
    }

    /// Checks a subscription filter (`Action::Subscribe`, a `$share/<group>/` prefix allowed) or a
    /// publish topic against the scope. The error quotes the rule and how to turn the check off.
    pub fn check(&self, action: Action, topic: &str) -> Result<(), TopicError> {
        let inner = match action {
            Action::Subscribe => split_shared(topic).1,
            Action::Publish => topic,
        };
        // The hot path (every push of a source): a prefix test, nothing allocated.
        let own = |source_id: &str| {
            inner
                .strip_prefix("v1/sources/")
                .and_then(|rest| rest.strip_prefix(source_id))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        match self {
            Scope::Open => return Ok(()),
            Scope::Source { source_id } if own(source_id) => return Ok(()),
            _ => {}
        }
        let levels: Vec<&str> = inner.split('/').collect();
        let (allowed, who, kind) = match self {
            Scope::Open => return Ok(()),
            Scope::User { company } => {
                let allowed = match action {
                    Action::Subscribe => {
                        levels.len() >= 3
                            && levels[0] == "v1"
                            && levels[1] == "raw"
                            && !matches!(levels[2], "+" | "#" | "")
                            && company.as_deref().is_none_or(|c| c == levels[2])
                    }
                    Action::Publish => {
                        levels.len() == 5
                            && levels[0] == "v1"
                            && levels[1] == "sources"
                            && !matches!(levels[2], "+" | "#" | "")
                            && levels[3] == "cmd"
                            && levels[4] == "writedata"
                    }
                };
                let who = match company {
                    Some(company) => format!("a user account of company {company:?}"),
                    None => "a user account".to_owned(),
                };
                (allowed, who, AccountKind::User)
            }
            Scope::Source { source_id } => {
                (false, format!("source {source_id:?}"), AccountKind::Source)
            }
        };
        if allowed {
            return Ok(());
        }
        let segment = match action {
            Action::Subscribe => Segment::Filter,
            Action::Publish => Segment::Topic,
        };
        let mut reason = format!(
            "{who} cannot {} it ({}): {}",
            action.verb(),
            "Capture disconnects a client that tries",
            rule(kind)
        );
        if let (Scope::User { .. }, Action::Publish) = (self, action) {
            if levels.len() >= 4
                && levels[0] == "v1"
                && levels[1] == "sources"
                && levels[3] == "data"
            {
                reason.push_str(
                    "; pushing data needs the source's own account: connect with cm.SourceClient and the \
                     credentials of the source's auth config (its page in the Capture portal)",
                );
            }
        }
        reason.push_str("; ");
        reason.push_str(ESCAPE);
        Err(TopicError {
            segment,
            value: topic.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "5b0f2c1e-6d1a-4c55-9d64-2f3f4b6c7a10";

    fn user(company: Option<&str>) -> Scope {
        Scope::new(AccountKind::User, company, None)
    }

    #[test]
    fn a_user_reads_its_company_raw_tree_and_writes_commands() {
        let acme = user(Some("AcmeCorp"));
        let table: &[(Action, &str, bool)] = &[
            (Action::Subscribe, "v1/raw/AcmeCorp/#", true),
            (Action::Subscribe, "v1/raw/AcmeCorp/+/+/Monitoring/#", true),
            (Action::Subscribe, "$share/g/v1/raw/AcmeCorp/#", true),
            (Action::Subscribe, "v1/raw/AcmeCorp", true),
            (Action::Subscribe, "v1/raw/SomeoneElse/#", false),
            (Action::Subscribe, "$share/g/v1/raw/SomeoneElse/#", false),
            (Action::Subscribe, "v1/raw/+/#", false),
            (Action::Subscribe, "v1/sources/x/cmd/writedata", false),
            (Action::Subscribe, "sensors/#", false),
            (Action::Publish, "v1/sources/x/cmd/writedata", true),
            (Action::Publish, "v1/sources/x/cmd/other", false),
            (Action::Publish, "v1/sources/x/data/read/C/M", false),
            (Action::Publish, "v1/raw/AcmeCorp/s/c/m/k", false),
            (Action::Publish, "v1/sources/x/cmd/writedata/more", false),
        ];
        for (action, topic, ok) in table {
            assert_eq!(
                acme.check(*action, topic).is_ok(),
                *ok,
                "{action:?} {topic}"
            );
        }
        // Without a company, any exact company.
        assert!(user(None)
            .check(Action::Subscribe, "v1/raw/SomeoneElse/#")
            .is_ok());
        assert!(user(None).check(Action::Subscribe, "v1/raw/+/#").is_err());
    }

    #[test]
    fn a_source_stays_in_its_subtree() {
        let scope = Scope::new(AccountKind::Source, Some("AcmeCorp"), Some(SRC));
        let own = format!("v1/sources/{SRC}/data/read/C/M");
        assert!(scope.check(Action::Publish, &own).is_ok());
        assert!(scope
            .check(Action::Subscribe, &format!("v1/sources/{SRC}/cmd/+"))
            .is_ok());
        assert!(scope
            .check(Action::Subscribe, &format!("v1/sources/{SRC}/#"))
            .is_ok());
        for other in [
            "v1/sources/other/data/read/C/M",
            "v1/sources/+/cmd/writedata",
            "v1/raw/AcmeCorp/#",
            &format!("v1/sources/{SRC}x/cmd/+"),
        ] {
            assert!(scope.check(Action::Subscribe, other).is_err(), "{other}");
        }
    }

    #[test]
    fn open_and_unknown_scopes_check_nothing() {
        assert_eq!(
            Scope::new(AccountKind::Unknown, Some("A"), None),
            Scope::Open
        );
        assert_eq!(Scope::new(AccountKind::Source, None, None), Scope::Open);
        assert!(Scope::Open
            .check(Action::Publish, "anything/at/all")
            .is_ok());
    }

    #[test]
    fn a_refusal_quotes_the_rule_and_the_escape_hatch() {
        let err = user(Some("AcmeCorp"))
            .check(Action::Subscribe, "v1/raw/SomeoneElse/#")
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("v1/raw/SomeoneElse/#"), "{text}");
        assert!(text.contains("company \"AcmeCorp\""), "{text}");
        assert!(text.contains(rule(AccountKind::User)), "{text}");
        assert!(text.contains("scope=False"), "{text}");
        let push = user(None)
            .check(Action::Publish, "v1/sources/alice/data/read/PLC/Monitoring")
            .unwrap_err()
            .to_string();
        assert!(push.contains("cm.SourceClient"), "{push}");
    }
}
