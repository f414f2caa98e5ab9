//! Crypto-shredding, the pure part: which [`Text`] fields of a workflow's
//! events are personal, and sealing / opening them with a data subject's
//! AES-256-GCM key. Keys are kept apart from the events (the event store's
//! `subject_keys`); destroying a subject's key leaves the events intact and
//! verifiable (the hash covers the ciphertext) while their personal text can
//! no longer be read: it opens as [`crate::workflow::ERASED`].
//!
//! Callers supply the randomness (a fresh 96-bit nonce per text), so this
//! module stays free of I/O.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::workflow::{ModelCall, SealedText, Text, WorkflowEvent};

/// A data subject's key: 32 bytes for AES-256-GCM.
pub type SubjectKey = [u8; 32];

/// The kinds of free text a workflow records, as named in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextField {
    Request,
    Input,
    SubtaskTitle,
    Rationale,
    Comment,
    Output,
    CancelReason,
    /// Lubit's reasons, RUNE's findings, why a subtask was skipped or a
    /// workflow failed: they may quote the plan.
    Reason,
    /// A tool's error message: it may quote the tool's input.
    Error,
}

impl TextField {
    /// Every kind: the default set of personal fields.
    pub const ALL: [Self; 9] = [
        Self::Request,
        Self::Input,
        Self::SubtaskTitle,
        Self::Rationale,
        Self::Comment,
        Self::Output,
        Self::CancelReason,
        Self::Reason,
        Self::Error,
    ];
}

/// How a workflow's personal text is sealed: under which subject key, and
/// which fields. Recorded with the submission so that every node seals the
/// workflow's later events the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealing {
    pub key: Uuid,
    pub fields: Vec<TextField>,
}

/// Encrypts `text` under `key` (named `key_id`, which is bound as associated
/// data so a ciphertext cannot be passed off under another key's name).
pub fn seal(key: &SubjectKey, key_id: Uuid, nonce: [u8; 12], text: &str) -> SealedText {
    let cipher = Aes256Gcm::new(key.into());
    let data = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: text.as_bytes(),
                aad: key_id.as_bytes(),
            },
        )
        .expect("AES-GCM encrypts any text under 64 GiB");
    SealedText {
        key: key_id,
        nonce: BASE64.encode(nonce),
        data: BASE64.encode(data),
    }
}

/// Decrypts `sealed` with `key`; `None` when it does not open (another key,
/// altered ciphertext).
pub fn open(key: &SubjectKey, sealed: &SealedText) -> Option<String> {
    let nonce = BASE64.decode(&sealed.nonce).ok()?;
    if nonce.len() != 12 {
        return None;
    }
    let data = BASE64.decode(&sealed.data).ok()?;
    let plain = Aes256Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &data,
                aad: sealed.key.as_bytes(),
            },
        )
        .ok()?;
    String::from_utf8(plain).ok()
}

/// Opens a text: plain stays plain; sealed opens with its key from `keys`,
/// or becomes erased when the key is gone or does not open it.
pub fn open_text(text: &Text, keys: &HashMap<Uuid, SubjectKey>) -> Text {
    match text.as_sealed() {
        None => text.clone(),
        Some(sealed) => keys
            .get(&sealed.key)
            .and_then(|key| open(key, sealed))
            .map_or_else(Text::erased, Text::new),
    }
}

/// A model's answer (sealed like a rationale: it is one) and why it was
/// not used (like an error: it may quote the answer).
fn model_texts(model: &mut Option<ModelCall>) -> Vec<(TextField, &mut Text)> {
    let Some(model) = model else {
        return Vec::new();
    };
    let mut texts = vec![(TextField::Rationale, &mut model.answer)];
    texts.extend(
        model
            .fallback_reason
            .as_mut()
            .map(|r| (TextField::Error, r)),
    );
    texts
}

impl WorkflowEvent {
    /// Every free-text field of the event, with its kind.
    pub fn texts_mut(&mut self) -> Vec<(TextField, &mut Text)> {
        use TextField as F;
        use WorkflowEvent as E;
        match self {
            E::WorkflowSubmitted { request, input, .. } => {
                let mut texts = vec![(F::Request, request)];
                texts.extend(input.as_mut().map(|i| (F::Input, i)));
                texts
            }
            E::AnalysisProduced {
                subtasks,
                rationale,
                model,
                ..
            } => {
                let mut texts: Vec<_> = subtasks
                    .iter_mut()
                    .map(|s| (F::SubtaskTitle, &mut s.title))
                    .collect();
                texts.push((F::Rationale, rationale));
                texts.extend(model_texts(model));
                texts
            }
            E::GateDecided {
                reasons,
                rationale,
                model,
                ..
            } => {
                let mut texts: Vec<_> = reasons.iter_mut().map(|r| (F::Reason, r)).collect();
                texts.push((F::Rationale, rationale));
                texts.extend(model_texts(model));
                texts
            }
            E::HumanDecisionRecorded { comment, .. } => vec![(F::Comment, comment)],
            E::SubtaskSucceeded { output, .. } => vec![(F::Output, output)],
            E::SubtaskFailed { error, .. } => vec![(F::Error, error)],
            E::SubtaskSkipped { reason, .. }
            | E::SubtaskEscalated { reason, .. }
            | E::WorkflowFailed { reason } => {
                vec![(F::Reason, reason)]
            }
            E::EthicsReviewed {
                findings,
                rationale,
                model,
                ..
            } => {
                let mut texts: Vec<_> = findings.iter_mut().map(|f| (F::Reason, f)).collect();
                texts.extend(rationale.as_mut().map(|r| (F::Rationale, r)));
                texts.extend(model_texts(model));
                texts
            }
            E::WorkflowFlagged { findings } | E::WorkflowRejected { reasons: findings } => {
                findings.iter_mut().map(|f| (F::Reason, f)).collect()
            }
            E::WorkflowCancelled { reason } => reason
                .as_mut()
                .map(|r| (F::CancelReason, r))
                .into_iter()
                .collect(),
            E::SubtaskStarted { .. } | E::ExecutionFinished { .. } | E::WorkflowCompleted {} => {
                Vec::new()
            }
        }
    }

    /// The keys this event's sealed texts need.
    pub fn sealed_keys(&self) -> Vec<Uuid> {
        let mut event = self.clone();
        let mut keys: Vec<Uuid> = event
            .texts_mut()
            .into_iter()
            .filter_map(|(_, t)| t.as_sealed().map(|s| s.key))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Seals the fields `sealing` names with `key`; with no key (destroyed)
    /// they are recorded as erased. Other fields stay as they are.
    pub fn seal(
        &mut self,
        sealing: &Sealing,
        key: Option<&SubjectKey>,
        mut nonce: impl FnMut() -> [u8; 12],
    ) {
        for (field, text) in self.texts_mut() {
            if !sealing.fields.contains(&field) || !text.is_plain() {
                continue;
            }
            *text = match key {
                Some(key) => Text::sealed(seal(key, sealing.key, nonce(), text.as_str())),
                None => Text::erased(),
            };
        }
    }

    /// Opens every sealed text with `keys` (see [`open_text`]).
    pub fn open(&mut self, keys: &HashMap<Uuid, SubjectKey>) {
        for (_, text) in self.texts_mut() {
            if text.as_sealed().is_some() {
                *text = open_text(text, keys);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{Priority, ERASED, SEALED};

    fn submitted(request: &str) -> WorkflowEvent {
        WorkflowEvent::WorkflowSubmitted {
            request: Text::new(request),
            input: Some(Text::new("{\"name\": \"김민수\"}")),
            priority: Priority::Normal,
            sealing: None,
        }
    }

    #[test]
    fn sealed_text_opens_with_its_key_only_and_survives_the_stored_form() {
        let (key, other) = ([7u8; 32], [8u8; 32]);
        let id = Uuid::from_u128(1);
        let sealing = Sealing {
            key: id,
            fields: vec![TextField::Request],
        };
        let mut event = submitted("김민수(34)의 보고서를 요약해 주세요.");
        let mut counter = 0u8;
        event.seal(&sealing, Some(&key), || {
            counter += 1;
            [counter; 12]
        });
        let (_, _, payload) = event.encode();
        let stored = payload.to_string();
        assert!(!stored.contains("김민수(34)"), "{stored}");
        assert!(
            stored.contains("김민수"),
            "the input was not marked personal"
        );
        let mut back = WorkflowEvent::decode("WorkflowSubmitted", 2, &payload).unwrap();
        assert_eq!(back.sealed_keys(), vec![id]);
        let WorkflowEvent::WorkflowSubmitted { request, .. } = &back else {
            unreachable!()
        };
        assert_eq!(request.as_str(), SEALED);
        let mut wrong = back.clone();
        wrong.open(&HashMap::from([(id, other)]));
        back.open(&HashMap::from([(id, key)]));
        let text = |e: &WorkflowEvent| match e {
            WorkflowEvent::WorkflowSubmitted { request, .. } => request.as_str().to_string(),
            _ => unreachable!(),
        };
        assert_eq!(text(&back), "김민수(34)의 보고서를 요약해 주세요.");
        assert_eq!(text(&wrong), ERASED);
        let mut gone = WorkflowEvent::decode("WorkflowSubmitted", 2, &payload).unwrap();
        gone.open(&HashMap::new());
        assert_eq!(text(&gone), ERASED);
    }

    #[test]
    fn a_schema_1_submission_loads_without_sealing() {
        let v1 = serde_json::json!({"request": "요청", "input": null, "priority": "NORMAL"});
        let event = WorkflowEvent::decode("WorkflowSubmitted", 1, &v1).unwrap();
        assert_eq!(event, submitted_plain("요청"));
        assert_eq!(event.schema_version(), 2);
    }

    fn submitted_plain(request: &str) -> WorkflowEvent {
        WorkflowEvent::WorkflowSubmitted {
            request: Text::new(request),
            input: None,
            priority: Priority::Normal,
            sealing: None,
        }
    }

    #[test]
    fn a_changed_ciphertext_or_key_name_does_not_open() {
        let key = [3u8; 32];
        let sealed = seal(&key, Uuid::from_u128(5), [1; 12], "secret");
        assert_eq!(open(&key, &sealed).as_deref(), Some("secret"));
        let mut renamed = sealed.clone();
        renamed.key = Uuid::from_u128(6);
        assert_eq!(open(&key, &renamed), None);
        let mut bytes = BASE64.decode(&sealed.data).unwrap();
        bytes[0] ^= 1;
        let altered = SealedText {
            data: BASE64.encode(bytes),
            ..sealed
        };
        assert_eq!(open(&key, &altered), None);
    }

    #[test]
    fn a_model_s_answer_and_why_it_was_not_used_are_sealed_and_open_again() {
        let answer = "김민수 씨의 요청은 승인합니다";
        let mut event = WorkflowEvent::GateDecided {
            round: 0,
            verdict: crate::workflow::Verdict::Approve,
            priority: Priority::Normal,
            risk: 0.1,
            reasons: Vec::new(),
            rationale: Text::new("ok"),
            model: Some(ModelCall {
                cache_key: None,
                reused_from: None,
                provider: "openai-compatible".into(),
                endpoint: "http://127.0.0.1:1/v1".into(),
                model: "m".into(),
                prompt_version: "lubit-llm/1".into(),
                prompt_sha256: "0".repeat(64),
                answer: Text::new(answer),
                input_tokens: None,
                output_tokens: None,
                latency_ms: 1,
                requests: 1,
                fallback: true,
                fallback_reason: Some(Text::new("quotes 김민수")),
            }),
        };
        let key = [7u8; 32];
        let key_id = Uuid::from_u128(3);
        let sealing = Sealing {
            key: key_id,
            fields: TextField::ALL.to_vec(),
        };
        event.seal(&sealing, Some(&key), || [4; 12]);
        let stored = event.encode().2.to_string();
        assert!(!stored.contains("김민수"), "{stored}");
        event.open(&HashMap::from([(key_id, key)]));
        let WorkflowEvent::GateDecided {
            model: Some(model), ..
        } = &event
        else {
            unreachable!()
        };
        assert_eq!(model.answer.as_str(), answer);
        assert_eq!(
            model.fallback_reason.as_ref().unwrap().as_str(),
            "quotes 김민수"
        );
    }

    #[test]
    fn without_a_key_the_personal_fields_are_recorded_erased() {
        let mut event = submitted("hello");
        let sealing = Sealing {
            key: Uuid::from_u128(1),
            fields: TextField::ALL.to_vec(),
        };
        event.seal(&sealing, None, || [0; 12]);
        let WorkflowEvent::WorkflowSubmitted { request, input, .. } = &event else {
            unreachable!()
        };
        assert_eq!(
            (request.as_str(), input.as_ref().unwrap().as_str()),
            (ERASED, ERASED)
        );
    }

    #[test]
    fn the_column_form_round_trips_every_kind_of_text() {
        let sealed = Text::sealed(seal(&[1; 32], Uuid::from_u128(9), [2; 12], "x"));
        for text in [
            Text::new("plain 텍스트"),
            Text::new("\u{1}sealed:not really"),
            Text::new("\u{1}\u{1}"),
            sealed,
            Text::new(""),
        ] {
            assert_eq!(Text::from_column(&text.to_column()), text, "{text:?}");
        }
        assert_eq!(
            Text::from_column(&Text::erased().to_column()).as_str(),
            ERASED
        );
    }

    #[test]
    fn a_joined_column_keeps_each_sealed_part_and_plain_lists_stay_plain() {
        use crate::workflow::{join_column, read_column};
        let sealed = Text::sealed(seal(&[1; 32], Uuid::from_u128(9), [2; 12], "김민수"));
        let tricky = "\u{1}parts:[\"x\",[]]";
        let column = join_column(&[Text::new("a"), Text::new(tricky)], "; ");
        assert_eq!(
            read_column(&column),
            (String::new(), vec![Text::new(format!("a; {tricky}"))])
        );
        let column = join_column(&[Text::new(tricky)], "; ");
        assert_eq!(
            read_column(&column),
            (String::new(), vec![Text::new(tricky)])
        );
        let mixed = [Text::new("no tool for"), sealed];
        let column = join_column(&mixed, "; ");
        assert!(!column.contains("김민수"));
        assert_eq!(read_column(&column), ("; ".to_string(), mixed.to_vec()));
        assert_eq!(
            read_column("plain"),
            (String::new(), vec![Text::new("plain")])
        );
    }
}
