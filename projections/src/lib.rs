//! Read models of agentledger (to be filled by issue #4): the projection
//! runner and the workflow status, audit trail and agent metrics tables, each
//! written with its checkpoint in one transaction.
//!
//! Depends on `agentledger-domain` and `agentledger-eventstore`; must never
//! append events or take a time from anywhere but the events themselves.
