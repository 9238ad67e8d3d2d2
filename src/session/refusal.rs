//! Capture refuses a subscribe or publish outside the account's scope by closing the connection,
//! which looks like a broker restart. A refusal repeats: the first hang-ups right after the same
//! unanswered request only make it a suspect, and it is sent again; the third is the refusal (two
//! proved too few: a broker restarted twice in quick succession hung up right after the same
//! stalled publish). Keyed on the exact packet outstanding when the connection dropped.

use std::collections::HashMap;
use std::time::Duration;

/// How soon after a SUBSCRIBE or PUBLISH a hang-up counts against it.
pub const WINDOW: Duration = Duration::from_secs(2);
/// Hang-ups right after the same request that make it a refusal.
pub const STRIKES: u32 = 3;

/// What a hang-up means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing was outstanding: a plain disconnect.
    Nothing,
    /// A request was outstanding; it is sent again to see whether the hang-up repeats.
    Suspect,
    /// These filters are refused: fail their subscriptions, do not send them again.
    Filters(Vec<String>),
    /// This publish (by its id) is refused: fail it, do not send it again.
    Publish(u64),
}

#[derive(Debug, Default)]
pub struct Refusals {
    filters: HashMap<String, u32>,
    publish: Option<(u64, u32)>,
}

impl Refusals {
    /// The broker hung up with `filters` (sent within `WINDOW`) unanswered, or, when there are none,
    /// with the publish `publish` (sent within `WINDOW`) unacknowledged.
    pub fn hung_up(&mut self, filters: &[String], publish: Option<u64>) -> Verdict {
        if !filters.is_empty() {
            let mut refused = Vec::new();
            let mut suspects = HashMap::new();
            for filter in filters {
                let strikes = self.filters.get(filter).copied().unwrap_or(0) + 1;
                if strikes >= STRIKES {
                    refused.push(filter.clone());
                } else {
                    suspects.insert(filter.clone(), strikes);
                }
            }
            self.filters = suspects;
            return if refused.is_empty() {
                Verdict::Suspect
            } else {
                Verdict::Filters(refused)
            };
        }
        let Some(id) = publish else {
            return Verdict::Nothing;
        };
        let strikes = match self.publish {
            Some((suspect, strikes)) if suspect == id => strikes + 1,
            _ => 1,
        };
        if strikes >= STRIKES {
            self.publish = None;
            Verdict::Publish(id)
        } else {
            self.publish = Some((id, strikes));
            Verdict::Suspect
        }
    }

    /// The broker answered the SUBSCRIBE for `filter`: it was no refusal.
    pub fn answered_filter(&mut self, filter: &str) {
        self.filters.remove(filter);
    }

    /// The broker acknowledged publish `id`.
    pub fn answered_publish(&mut self, id: u64) {
        if self.publish.is_some_and(|(suspect, _)| suspect == id) {
            self.publish = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_hang_ups_after_the_same_subscribe_refuse_it() {
        let mut r = Refusals::default();
        let f = vec!["v1/raw/Other/#".to_owned()];
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
        assert_eq!(r.hung_up(&f, None), Verdict::Filters(f.clone()));
        // Answered in between: the count starts again.
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
        r.answered_filter(&f[0]);
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
        // Another filter in between resets the first.
        assert_eq!(r.hung_up(&["x".to_owned()], None), Verdict::Suspect);
        assert_eq!(r.hung_up(&f, None), Verdict::Suspect);
    }

    #[test]
    fn publishes_are_judged_by_id_and_subscribes_come_first() {
        let mut r = Refusals::default();
        assert_eq!(r.hung_up(&[], None), Verdict::Nothing);
        assert_eq!(r.hung_up(&[], Some(7)), Verdict::Suspect);
        assert_eq!(
            r.hung_up(&[], Some(8)),
            Verdict::Suspect,
            "another publish: a restart"
        );
        assert_eq!(r.hung_up(&[], Some(8)), Verdict::Suspect);
        assert_eq!(r.hung_up(&[], Some(8)), Verdict::Publish(8));
        assert_eq!(r.hung_up(&[], Some(9)), Verdict::Suspect);
        r.answered_publish(9);
        assert_eq!(r.hung_up(&[], Some(9)), Verdict::Suspect);
        assert_eq!(
            r.hung_up(&["f".to_owned()], Some(9)),
            Verdict::Suspect,
            "an unanswered subscribe is the suspect, not the publish"
        );
    }
}
