//! The `Workflow` aggregate: its state is a pure fold over its events
//! ([`Workflow::apply`]), and commands are checked against that state
//! ([`handle`]) to produce new events or a typed error.
//!
//! ```text
//! Submitted → (analysis) → Gating → Executing → Reviewing → Completed
//!     ↑ revise, at most 2 rounds: Analysing ┘  ├ reject → Rejected   ├ flag → Flagged
//!                                              └ escalate → AwaitingHuman → approve / reject
//! Executing: a call of unknown outcome to a tool not idempotent → AwaitingHuman
//! any non-final state: cancel → Cancelled; a subtask out of attempts → Failed
//! ```
//!
//! `Submitted` waits for the first analysis, `Analysing` for a revised one.
//! Outcomes are recorded with the decision that causes them, in one append
//! (a reject verdict is `GateDecided` + `WorkflowRejected`).

mod command;
mod event;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::privacy::Sealing;

pub use command::{
    handle, Command, DomainError, MAX_ATTEMPTS, MAX_INPUT_BYTES, MAX_REQUEST_BYTES, MAX_REVISIONS,
};
pub use event::{
    CacheRef, DecodeError, FailureKind, GateRef, ModelCall, ToolIntent, WorkflowEvent,
};

/// Free text that may carry personal data: the request, the input document,
/// subtask titles and outputs, rationales that quote them, human comments.
/// One type, so that crypto-shredding ([`crate::privacy`]) finds every such
/// field. Its `Debug` shows the length only, keeping the text out of logs.
///
/// A text is plain, sealed (encrypted with a data subject's key, as stored
/// in events) or erased (its key was destroyed). Stored, a plain or erased
/// text is a JSON string and a sealed one `{"sealed": {key, nonce, data}}`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Text(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Plain(String),
    Sealed(SealedText),
    Erased,
}

impl Default for Repr {
    fn default() -> Self {
        Self::Plain(String::new())
    }
}

/// A text encrypted with AES-256-GCM under a data subject's key (see
/// [`crate::privacy`]): the key's id, the nonce and ciphertext in base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedText {
    pub key: Uuid,
    pub nonce: String,
    pub data: String,
}

/// What a sealed text shows until it is opened.
pub const SEALED: &str = "[sealed]";
/// What an erased text shows: its key was destroyed.
pub const ERASED: &str = "[erased]";

/// Marks the column form of a sealed text in read models (see
/// [`Text::to_column`]); a plain text starting with it gets it doubled.
const COLUMN_MARK: char = '\u{1}';

impl Text {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self(Repr::Plain(text.into()))
    }

    /// A text whose key was destroyed.
    pub fn erased() -> Self {
        Self(Repr::Erased)
    }

    /// A sealed text.
    pub fn sealed(sealed: SealedText) -> Self {
        Self(Repr::Sealed(sealed))
    }

    /// The text; [`SEALED`] or [`ERASED`] when it cannot be read here.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Plain(text) => text,
            Repr::Sealed(_) => SEALED,
            Repr::Erased => ERASED,
        }
    }

    /// The sealed form, when sealed.
    pub fn as_sealed(&self) -> Option<&SealedText> {
        match &self.0 {
            Repr::Sealed(sealed) => Some(sealed),
            _ => None,
        }
    }

    /// True when plain (readable).
    pub fn is_plain(&self) -> bool {
        matches!(self.0, Repr::Plain(_))
    }

    /// The text as one string column of a read model: plain text as it is,
    /// a sealed one as a marked encoding that [`Text::from_column`] reads
    /// back (so read models keep ciphertext, never the personal text), an
    /// erased one as [`ERASED`].
    pub fn to_column(&self) -> String {
        match &self.0 {
            Repr::Plain(text) if text.starts_with(COLUMN_MARK) => format!("{COLUMN_MARK}{text}"),
            Repr::Plain(text) => text.clone(),
            Repr::Sealed(s) => format!("{COLUMN_MARK}sealed:{}:{}:{}", s.key, s.nonce, s.data),
            Repr::Erased => ERASED.to_string(),
        }
    }

    /// Reads [`Text::to_column`]'s form back.
    pub fn from_column(column: &str) -> Self {
        let Some(rest) = column.strip_prefix(COLUMN_MARK) else {
            return Self::new(column);
        };
        if let Some(sealed) = rest.strip_prefix("sealed:") {
            let mut parts = sealed.splitn(3, ':');
            if let (Some(key), Some(nonce), Some(data)) = (parts.next(), parts.next(), parts.next())
            {
                if let Ok(key) = key.parse() {
                    return Self::sealed(SealedText {
                        key,
                        nonce: nonce.into(),
                        data: data.into(),
                    });
                }
            }
        }
        Self::new(rest)
    }
}

/// Several texts as one read-model column, shown joined by `separator`:
/// plain parts become one plain column; with a sealed part, a marked list
/// of the parts' column forms that [`read_column`] takes apart again.
pub fn join_column(parts: &[Text], separator: &str) -> String {
    if parts.iter().all(|t| t.as_sealed().is_none()) {
        let joined: Vec<&str> = parts.iter().map(Text::as_str).collect();
        return Text::new(joined.join(separator)).to_column();
    }
    let columns: Vec<String> = parts.iter().map(Text::to_column).collect();
    let list = serde_json::to_string(&(separator, columns)).expect("strings serialise");
    format!("{COLUMN_MARK}parts:{list}")
}

/// A read-model column read back: its texts, and the separator to show
/// them joined with (one text, for a column of [`Text::to_column`]).
pub fn read_column(column: &str) -> (String, Vec<Text>) {
    let parts = column
        .strip_prefix(COLUMN_MARK)
        .and_then(|rest| rest.strip_prefix("parts:"))
        .and_then(|list| serde_json::from_str::<(String, Vec<String>)>(list).ok());
    match parts {
        Some((separator, columns)) => (
            separator,
            columns.iter().map(|c| Text::from_column(c)).collect(),
        ),
        None => (String::new(), vec![Text::from_column(column)]),
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Plain(text) => write!(f, "Text({} chars)", text.chars().count()),
            Repr::Sealed(s) => write!(f, "Text(sealed with {})", s.key),
            Repr::Erased => write!(f, "Text(erased)"),
        }
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Stored<'a> {
            sealed: &'a SealedText,
        }
        match &self.0 {
            Repr::Sealed(sealed) => Stored { sealed }.serialize(serializer),
            _ => serializer.serialize_str(self.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Plain(String),
            Sealed { sealed: SealedText },
        }
        Ok(match Stored::deserialize(deserializer)? {
            Stored::Plain(text) => Self::new(text),
            Stored::Sealed { sealed } => Self::sealed(sealed),
        })
    }
}

/// How urgent a workflow is; orders the queue of waiting work.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

/// Where a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkflowState {
    /// Not submitted yet (the state before the first event).
    #[default]
    New,
    Submitted,
    Analysing,
    Gating,
    AwaitingHuman,
    Executing,
    Reviewing,
    Completed,
    Rejected,
    Failed,
    Flagged,
    Cancelled,
}

impl WorkflowState {
    /// Completed, rejected, failed, flagged or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Rejected | Self::Failed | Self::Flagged | Self::Cancelled
        )
    }
}

/// Lubit's verdict on an analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Revise,
    Reject,
    Escalate,
}

/// One step of Sena's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskPlan {
    /// Unique within the analysis, e.g. `st-1`.
    pub id: String,
    pub title: Text,
    /// A tool registry name.
    pub tool: String,
    /// Ids of subtasks whose outputs this one takes as input.
    pub depends_on: Vec<String>,
}

/// RUNE's four scores, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EthicsScores {
    pub transparency: f64,
    pub collaboration: f64,
    pub autonomy: f64,
    pub fairness: f64,
}

/// Where a subtask stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SubtaskState {
    #[default]
    Pending,
    Running,
    /// Failed, another attempt to come.
    Retrying,
    Succeeded,
    Failed,
    Skipped,
}

impl SubtaskState {
    /// Succeeded, failed or skipped.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}

/// A subtask of the current plan and its progress.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subtask {
    pub plan: Option<SubtaskPlan>,
    pub state: SubtaskState,
    pub attempts: u8,
    pub output: Option<Text>,
    /// The intent recorded with the last attempt's start, if its tool has one.
    pub intent: Option<ToolIntent>,
    /// How the last failed attempt failed.
    pub last_failure: Option<FailureKind>,
}

/// The state of one workflow, as folded from its events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workflow {
    pub state: WorkflowState,
    pub priority: Priority,
    pub request: Text,
    pub input: Option<Text>,
    /// How its personal text is sealed, when it has a data subject.
    pub sealing: Option<Sealing>,
    /// The analysis round the workflow is in (0 until a revision is asked).
    pub round: u8,
    pub subtasks: Vec<Subtask>,
    pub verdict: Option<Verdict>,
    pub ethics: Option<(EthicsScores, bool)>,
    /// Events applied so far.
    pub events: u64,
}

impl Workflow {
    /// Folds `events` from the empty state.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a WorkflowEvent>) -> Self {
        events.into_iter().fold(Self::default(), Self::apply)
    }

    /// The state after `event`. Total: a recorded event always applies (the
    /// history is the truth; commands are where rules are enforced), so the
    /// fold never panics, whatever a stream holds.
    pub fn apply(mut self, event: &WorkflowEvent) -> Self {
        use WorkflowEvent as E;
        self.events += 1;
        match event {
            E::WorkflowSubmitted {
                request,
                input,
                priority,
                sealing,
            } => {
                self.state = WorkflowState::Submitted;
                self.request = request.clone();
                self.input = input.clone();
                self.sealing = sealing.clone();
                self.priority = *priority;
            }
            E::AnalysisProduced {
                round, subtasks, ..
            } => {
                self.state = WorkflowState::Gating;
                self.round = *round;
                self.subtasks = subtasks
                    .iter()
                    .map(|p| Subtask {
                        plan: Some(p.clone()),
                        ..Subtask::default()
                    })
                    .collect();
            }
            E::GateDecided {
                verdict, priority, ..
            } => {
                self.verdict = Some(*verdict);
                self.priority = *priority;
                self.state = match verdict {
                    Verdict::Approve => WorkflowState::Executing,
                    Verdict::Revise => {
                        self.round = self.round.saturating_add(1);
                        WorkflowState::Analysing
                    }
                    Verdict::Escalate => WorkflowState::AwaitingHuman,
                    // The outcome event that accompanies it makes it final.
                    Verdict::Reject => self.state,
                };
            }
            E::HumanDecisionRecorded { approve, .. } => {
                if *approve {
                    self.state = WorkflowState::Executing;
                }
            }
            E::SubtaskStarted {
                subtask,
                attempt,
                intent,
            } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Running;
                    s.attempts = s.attempts.max(*attempt);
                    s.intent = intent.clone();
                }
            }
            E::SubtaskSucceeded {
                subtask, output, ..
            } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Succeeded;
                    s.output = Some(output.clone());
                }
            }
            E::SubtaskFailed {
                subtask,
                will_retry,
                kind,
                ..
            } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.last_failure = Some(*kind);
                    s.state = if *will_retry {
                        SubtaskState::Retrying
                    } else {
                        SubtaskState::Failed
                    };
                }
            }
            E::SubtaskSkipped { subtask, .. } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Skipped;
                }
            }
            E::SubtaskEscalated { .. } => self.state = WorkflowState::AwaitingHuman,
            E::ExecutionFinished { .. } => self.state = WorkflowState::Reviewing,
            E::EthicsReviewed { scores, passed, .. } => self.ethics = Some((*scores, *passed)),
            E::WorkflowCompleted {} => self.state = WorkflowState::Completed,
            E::WorkflowRejected { .. } => self.state = WorkflowState::Rejected,
            E::WorkflowFailed { .. } => self.state = WorkflowState::Failed,
            E::WorkflowFlagged { .. } => self.state = WorkflowState::Flagged,
            E::WorkflowCancelled { .. } => self.state = WorkflowState::Cancelled,
        }
        self
    }

    /// The subtask with `id` in the current plan.
    pub fn subtask(&self, id: &str) -> Option<&Subtask> {
        self.subtasks
            .iter()
            .find(|s| s.plan.as_ref().is_some_and(|p| p.id == id))
    }

    fn subtask_mut(&mut self, id: &str) -> Option<&mut Subtask> {
        self.subtasks
            .iter_mut()
            .find(|s| s.plan.as_ref().is_some_and(|p| p.id == id))
    }

    /// Subtasks done (succeeded, failed or skipped) and in all.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.subtasks.iter().filter(|s| s.state.is_final()).count(),
            self.subtasks.len(),
        )
    }
}

#[cfg(test)]
mod tests;
