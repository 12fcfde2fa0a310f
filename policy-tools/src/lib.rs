//! Operator tools over policy directories: the logic behind `meshgate policy test|explain|diff|
//! suggest`. They reuse the loader, validator, evaluator and path normalizer as they are, so a tool
//! can never disagree with what a sidecar decides; the CLI only parses arguments and prints.

#![forbid(unsafe_code)]

pub mod diff;
pub mod explain;
pub mod flows;
pub mod lint;
pub mod probe;
pub mod suggest;
pub mod test_cases;

#[cfg(test)]
mod tests;
