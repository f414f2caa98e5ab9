//! The agent runtime of agentledger (to be filled by issue #3): async tool and
//! agent traits with deadlines and cancellation, the executor, and workers
//! that claim work and append decisions with the expected version they read.
//!
//! Depends on `agentledger-domain` and `agentledger-eventstore`; must never
//! know about GraphQL or HTTP.
