//! Finds the first matching rule without looking at every rule.
//!
//! Most rules name their callers by exact SPIFFE ID. The index maps each such ID to the rules
//! that name it, and keeps two short lists for the rest: rules with wildcard principals (or only
//! `notPrincipals`), which must be checked for every peer, and rules without `from`, which apply
//! to everyone. A lookup checks only the peer's own rules plus those two lists, so its cost
//! follows the number of rules that *could* match, not the size of the policy set.
//!
//! "First" is deterministic: rules are ordered by policy (sorted by namespace/name) then rule
//! index, each list is kept in that order, and the earliest match across the three lists wins.

use std::collections::HashMap;

use crate::matcher::{PeerScope, RuleMatcher};

/// A rule's place: index of its policy in the snapshot, then its index in the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: u32,
    pub rule: u32,
}

/// The rules of one group of policies (e.g. enforce-mode DENY), indexed by principal.
#[derive(Debug, Default)]
pub struct RuleIndex {
    by_principal: HashMap<Box<str>, Vec<RuleRef>>,
    wildcard: Vec<RuleRef>,
    everyone: Vec<RuleRef>,
}

impl RuleIndex {
    /// Adds a rule. Rules must be added in [`RuleRef`] order.
    pub fn add(&mut self, at: RuleRef, rule: &RuleMatcher) {
        match rule.peer_scope() {
            PeerScope::Everyone => self.everyone.push(at),
            PeerScope::Wildcard => self.wildcard.push(at),
            PeerScope::Exact(ids) => {
                for id in ids {
                    self.by_principal.entry(id.into()).or_default().push(at);
                }
            }
        }
    }

    /// True when no rule was indexed (lets the evaluator skip a group without hashing).
    pub fn is_empty(&self) -> bool {
        self.by_principal.is_empty() && self.wildcard.is_empty() && self.everyone.is_empty()
    }

    /// The earliest rule, among those that could match `peer`, for which `matches` holds.
    pub fn first_match(&self, peer: &str, matches: impl Fn(RuleRef) -> bool) -> Option<RuleRef> {
        let exact = self.by_principal.get(peer).map_or(&[][..], Vec::as_slice);
        [exact, &self.wildcard, &self.everyone]
            .into_iter()
            .filter_map(|list| list.iter().copied().find(|&r| matches(r)))
            .min()
    }
}
