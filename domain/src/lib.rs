//! The agentledger domain: commands, events, the `Workflow` aggregate as a
//! pure fold, the four reference agent policies (Sena, Lubit, GitCode, RUNE)
//! and the built-in tools as pure functions.
//!
//! Must never: do I/O, be async, read a clock (time is passed in), or know
//! how events are stored.
//!
//! Built so far (issue #3 in progress): [`tools`] (the built-in tools) and
//! [`workflow`] (events, the fold and commands); the policies are to come.

pub mod text;
pub mod tools;
pub mod workflow;
