//! The agentledger domain: commands, events, the `Workflow` aggregate as a
//! pure fold, the four reference agent policies (Sena, Lubit, GitCode, RUNE)
//! and the built-in tools as pure functions.
//!
//! Must never: do I/O, be async, read a clock (time is passed in), or know
//! how events are stored.
//!
//! - [`workflow`]: events, the fold, commands;
//! - [`policy`]: Sena, Lubit, GitCode (as a plan) and RUNE, each described
//!   in a paragraph in its module docs;
//! - [`tools`]: the built-in tools;
//! - [`text`]: sentence and word splitting for English and Korean;
//! - [`names`]: stream prefixes, event names and agent roles that several
//!   crates spell.

pub mod names;
pub mod policy;
pub mod privacy;
pub mod text;
pub mod tools;
pub mod workflow;
