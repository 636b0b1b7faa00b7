//! The sync engine: the compose rules and expressions (pure: `compose_rules`, `expr`),
//! connector sources, runs, the compose writes (`compose_writes`: the store side of the rules),
//! schedules and retention.

pub mod compose_rules;
pub mod compose_writes;
pub mod expr;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod source;
