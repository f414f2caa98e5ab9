//! The four reference agents as deterministic policies: the same input and
//! configuration always give the same decision, and each decision comes with
//! its reasons. Real deployments may replace any of them (an LLM analyst, an
//! external gatekeeper); their decisions are recorded the same way.
//!
//! **Sena (analyst, [`sena`]).** Sena splits the request into steps. When the
//! request has numbered (`1.`, `2)`) or bulleted (`-`, `*`, `•`) lines, each
//! line is a step; numbered steps follow one another, bulleted steps are
//! independent unless they open with a sequencing word. Otherwise each
//! sentence is a step, cut further at a mid-sentence "then" ("…, then …",
//! "… and then …", "…, 그리고 나서 …"); a step that opens with "then", "after
//! that", "next", "finally", "그다음", "그리고 나서", "마지막으로" or "이후", or
//! that was cut off by a mid-sentence "then", depends on the step before it.
//! Identical independent steps are merged. Each step gets the registered tool
//! whose declared keywords begin the most words of the step (ties: registry
//! order); a follow-up step that matches none gets the follow-up tool
//! (`summarize`), any other step none. Confidence is the mean over steps of 1
//! (keyword match), ½ (follow-up fallback) or 0 (no tool). In a revision
//! round, steps without a tool are dropped and their dependents depend on the
//! step before.
//!
//! **Lubit (gatekeeper, [`lubit`]).** Lubit rejects outright a request over
//! the size limit (32 KiB), an empty analysis, and one with more than 20
//! subtasks. It then scores risk: 0.1, plus 0.6 when the request or a
//! subtask uses a high-risk term (delete, erase, wipe, password, 삭제, …;
//! word beginnings), plus 0.2 when Sena's confidence is below 0.5, plus 0.1
//! above 10 subtasks, at most 1. At risk 0.7 or more it escalates to a
//! person. Otherwise it checks the plan: duplicate ids, unknown or self
//! dependencies, cycles, tools not registered, and some but not all subtasks
//! without a tool are fixable (it asks for a revision, saying what to change,
//! up to 2 rounds, then rejects); a tool outside the configured allow-list,
//! or no subtask with a tool at all, is fatal (it rejects with the reasons).
//! A plan that passes is approved. The priority is the submitter's, one level
//! higher when the request says it is urgent (urgent, asap, 긴급, 즉시, …).
//!
//! **GitCode (executor, [`gitcode`]).** GitCode runs the approved plan in
//! dependency order: a subtask starts once every dependency succeeded, up to
//! 4 at a time per workflow; its tool reads the outputs of its dependencies,
//! else the input document, else the request. Each attempt has a deadline
//! (10 s). A failed or timed-out attempt is retried after a backoff of 100 ms,
//! then 200 ms (capped at 2 s), at most 3 attempts in all; a tool that
//! refuses its input is not retried. A subtask whose dependency failed or was
//! skipped is skipped, with that reason. An attempt left running by a worker
//! that stopped is recorded as abandoned and retried. When every subtask has
//! ended, execution finishes; any failure fails the workflow.
//!
//! **RUNE (ethics verifier, [`rune`]).** RUNE scores the history from 0 to 1:
//! *transparency*, the share of decisions (analyses, gate verdicts, human
//! decisions) that state their reasons; *collaboration*, the share of the
//! three hand-offs that happened (analysis, gate decision, finished
//! execution); *autonomy*, 1 when every subtask started under an approval of
//! the current plan by Lubit or a person and nothing ran after a person said
//! no, else 0; *fairness*, 1 minus 0.5 for each category of protected
//! attributes (age, gender, race, religion, nationality, disability; English
//! and Korean terms) named in the request, input, subtask titles or outputs.
//! Every score must reach its threshold (0.7 by default) to pass; otherwise
//! RUNE flags the workflow for a person, listing its findings.
//!
//! Every configuration here is serialisable: the runtime records a
//! fingerprint of it with each decision, so a decision can be traced to the
//! thresholds and term lists it was made under.

pub mod gitcode;
pub mod lubit;
pub mod rune;
pub mod sena;

/// The version of the reference policies, recorded with each decision.
pub const VERSION: &str = "1.0.0";
