//! The sync engine: composer rules and expressions (pure), connector sources, runs, the
//! composer's writes, schedules and retention.

pub mod compose;
pub mod composer;
pub mod expr;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod source;
