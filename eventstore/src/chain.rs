//! The per-stream hash chain: canonical encoding, hashing and verification.
//!
//! `hash = SHA-256(prev_hash ‖ canonical(event))`. The canonical encoding
//! (hash version 1) is compact JSON of the object
//! `{event_id, event_type, metadata, payload, recorded_at, schema_version, stream_id, stream_version}`
//! where `recorded_at` is microseconds since the Unix epoch, object keys are
//! sorted by their UTF-8 bytes at every depth, and numbers have one form: an
//! integral value in the 64-bit integer range (-2^63 to 2^64) is written as
//! an integer, whatever its notation; any other number in the shortest form
//! that round-trips. The encoding survives PostgreSQL's `jsonb`, which reorders and
//! de-duplicates keys and rewrites numbers (`1e2` → `100`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Position, RecordedEvent};

/// The hash version this build writes.
pub const HASH_VERSION: u16 = 1;

/// The `prev_hash` of a stream's first event.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The fields the hash covers, with payload and metadata already in canonical form.
pub(crate) struct HashedFields<'a> {
    pub event_id: Uuid,
    pub stream_id: &'a str,
    pub stream_version: u64,
    pub event_type: &'a str,
    pub schema_version: u32,
    /// `canonical_json(payload)`.
    pub payload: &'a [u8],
    /// `canonical_json(metadata)`.
    pub metadata: &'a [u8],
    pub recorded_at: DateTime<Utc>,
}

impl HashedFields<'_> {
    /// The canonical bytes, hash version 1.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192 + self.payload.len() + self.metadata.len());
        // Keys in sorted order, written by hand so that no serde_json feature
        // (such as `preserve_order`, enabled by another crate) can change them.
        out.extend_from_slice(b"{\"event_id\":\"");
        out.extend_from_slice(
            self.event_id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        out.extend_from_slice(b"\",\"event_type\":");
        write_string(&mut out, self.event_type);
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(self.metadata);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload);
        out.extend_from_slice(b",\"recorded_at\":");
        out.extend_from_slice(self.recorded_at.timestamp_micros().to_string().as_bytes());
        out.extend_from_slice(b",\"schema_version\":");
        out.extend_from_slice(self.schema_version.to_string().as_bytes());
        out.extend_from_slice(b",\"stream_id\":");
        write_string(&mut out, self.stream_id);
        out.extend_from_slice(b",\"stream_version\":");
        out.extend_from_slice(self.stream_version.to_string().as_bytes());
        out.push(b'}');
        out
    }

    /// `SHA-256(prev_hash ‖ canonical(self))`.
    pub fn hash(&self, prev_hash: &[u8; 32]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(prev_hash);
        hasher.update(self.canonical());
        hasher.finalize().into()
    }
}

/// A stored event as verification reads it: payload and metadata in
/// canonical form (the PostgreSQL store makes them straight from the stored
/// JSON text, without building `Value` trees).
pub type CanonicalEvent = RecordedEvent<Vec<u8>>;

impl CanonicalEvent {
    /// `e` with its documents in canonical form.
    pub fn of(e: &RecordedEvent) -> Self {
        Self {
            global_position: e.global_position,
            stream_id: e.stream_id.clone(),
            stream_version: e.stream_version,
            event_id: e.event_id,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            payload: canonical_json(&e.payload),
            metadata: canonical_json(&e.metadata),
            recorded_at: e.recorded_at,
            hash_version: e.hash_version,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

impl CanonicalEvent {
    /// `SHA-256(prev_hash ‖ canonical(content))`, from what is stored.
    pub fn recompute_hash(&self) -> [u8; 32] {
        HashedFields {
            event_id: self.event_id,
            stream_id: self.stream_id.as_str(),
            stream_version: self.stream_version,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            metadata: &self.metadata,
            recorded_at: self.recorded_at,
        }
        .hash(&self.prev_hash)
    }
}

/// The canonical form of the JSON text `json`, parsed without building a
/// `Value`: the same bytes as `canonical_json(&serde_json::from_slice(json)?)`
/// (a repeated key keeps its last value, as a map does).
pub fn canonical_from_slice(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut out = Vec::with_capacity(json.len());
    let mut reader = serde_json::Deserializer::from_slice(json);
    Canonical(&mut out).deserialize(&mut reader)?;
    reader.end()?;
    Ok(out)
}

/// Writes the canonical form of the value it deserializes.
struct Canonical<'o>(&'o mut Vec<u8>);

impl<'de> serde::de::DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        write_number(self.0, &v.into());
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        write_number(self.0, &v.into());
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        let n = serde_json::Number::from_f64(v).ok_or_else(|| E::custom("a non-finite number"))?;
        write_number(self.0, &n);
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write_string(self.0, v);
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(b'[');
        let mut first = true;
        loop {
            let mark = out.len();
            if !first {
                out.push(b',');
            }
            if seq.next_element_seed(Canonical(&mut *out))?.is_none() {
                out.truncate(mark);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        type Entry<'k> = (std::borrow::Cow<'k, str>, usize, usize);
        // Values are written to one buffer; entries point into it.
        let mut values = Vec::new();
        let mut entries: Vec<Entry<'de>> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let start = values.len();
            map.next_value_seed(Canonical(&mut values))?;
            entries.push((key, start, values.len()));
        }
        if !entries
            .windows(2)
            .all(|w| w[0].0.as_bytes() < w[1].0.as_bytes())
        {
            // Stable: of a repeated key the last stays last; keep it.
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            let mut kept: Vec<Entry<'de>> = Vec::with_capacity(entries.len());
            for entry in entries {
                if kept.last().is_some_and(|last| last.0 == entry.0) {
                    kept.pop();
                }
                kept.push(entry);
            }
            entries = kept;
        }
        let out = self.0;
        out.push(b'{');
        for (i, (key, start, end)) in entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_string(out, key);
            out.push(b':');
            out.extend_from_slice(&values[*start..*end]);
        }
        out.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeySeed)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
}

/// Recomputes a stored event's hash from what is stored.
pub fn recompute_hash(e: &RecordedEvent) -> [u8; 32] {
    let (payload, metadata) = (canonical_json(&e.payload), canonical_json(&e.metadata));
    HashedFields {
        event_id: e.event_id,
        stream_id: e.stream_id.as_str(),
        stream_version: e.stream_version,
        event_type: &e.event_type,
        schema_version: e.schema_version,
        payload: &payload,
        metadata: &metadata,
        recorded_at: e.recorded_at,
    }
    .hash(&e.prev_hash)
}

/// `value` in canonical form.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(&mut out, value);
    out
}

/// Writes `value` in canonical form: sorted keys, compact, one number form.
pub fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            // serde_json's map iterates in key order unless a crate in the
            // build turns on its `preserve_order`: sort only then.
            if map.keys().is_sorted_by(|a, b| a.as_bytes() <= b.as_bytes()) {
                write_entries(out, map.iter());
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                write_entries(out, entries.into_iter());
            }
            out.push(b'}');
        }
    }
}

fn write_entries<'a>(out: &mut Vec<u8>, entries: impl Iterator<Item = (&'a String, &'a Value)>) {
    for (i, (key, item)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_canonical(out, item);
    }
}

fn write_number(out: &mut Vec<u8>, n: &serde_json::Number) {
    // The 64-bit integer range, as floats: [-2^63, 2^64).
    const LOW: f64 = -9_223_372_036_854_775_808.0;
    const HIGH: f64 = 18_446_744_073_709_551_616.0;
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else {
        let f = n
            .as_f64()
            .expect("a JSON number without arbitrary precision is i64, u64 or f64");
        if f.fract() == 0.0 && (LOW..HIGH).contains(&f) {
            // An integral float is written as the integer it is exactly: jsonb
            // prints 1e16 as 10000000000000000, which reads back as an
            // integer. -0.0 becomes 0, 100.0 and 1e2 become 100.
            out.extend_from_slice((f as i128).to_string().as_bytes());
        } else {
            // Outside that range a number reads back as a float whatever its
            // notation; serde_json writes the shortest form that round-trips.
            let f = serde_json::Number::from_f64(f).expect("finite");
            out.extend_from_slice(f.to_string().as_bytes());
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    let mut ser = serde_json::Serializer::new(&mut *out);
    s.serialize(&mut ser)
        .expect("writing a string to a Vec cannot fail");
}

/// The result of recomputing a hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// True when every event checked out.
    pub ok: bool,
    /// How many events were checked.
    pub checked_events: u64,
    /// The first event whose record does not match its chain.
    pub first_broken_position: Option<Position>,
    /// Why it does not match.
    pub reason: Option<String>,
}

impl Verification {
    /// The verdict after `checked` events, broken at a position or not.
    fn of(checked: u64, broken: Option<(Position, String)>) -> Self {
        let (first_broken_position, reason) = broken.unzip();
        Self {
            ok: first_broken_position.is_none(),
            checked_events: checked,
            first_broken_position,
            reason,
        }
    }
}

/// Recomputes a stream's chain incrementally, one event at a time, in version order.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_version: u64,
    prev_hash: [u8; 32],
    checked: u64,
    broken: Option<(Position, String)>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_version: 0,
            prev_hash: GENESIS_HASH,
            checked: 0,
            broken: None,
        }
    }
}

impl ChainVerifier {
    /// A verifier expecting the stream's first event.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next event; after the first break, later events are ignored.
    pub fn check(&mut self, event: &RecordedEvent) {
        self.check_canonical(&CanonicalEvent::of(event));
    }

    /// [`ChainVerifier::check`] of an event read in canonical form.
    pub fn check_canonical(&mut self, event: &CanonicalEvent) {
        if self.broken.is_some() {
            return;
        }
        self.checked += 1;
        let problem = if event.stream_version != self.expected_version {
            Some(format!(
                "stream version {} where {} was expected",
                event.stream_version, self.expected_version
            ))
        } else if event.hash_version != HASH_VERSION {
            Some(format!("unknown hash version {}", event.hash_version))
        } else if event.prev_hash != self.prev_hash {
            Some("prev_hash does not match the previous event's hash".to_string())
        } else if event.recompute_hash() != event.hash {
            Some("content does not match its hash".to_string())
        } else {
            None
        };
        match problem {
            Some(reason) => self.broken = Some((event.global_position, reason)),
            None => {
                self.expected_version += 1;
                self.prev_hash = event.hash;
            }
        }
    }

    /// The verdict so far.
    pub fn finish(self) -> Verification {
        Verification::of(self.checked, self.broken)
    }
}

/// Recomputes every stream's chain while reading `$all` in position order:
/// memory grows with the number of streams (a verifier each), not with the
/// number of events.
#[derive(Debug, Default)]
pub struct LedgerVerifier {
    streams: std::collections::HashMap<crate::StreamId, ChainVerifier>,
    checked: u64,
}

impl LedgerVerifier {
    /// An empty verifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next event of `$all`.
    pub fn check(&mut self, event: &RecordedEvent) {
        self.check_canonical(&CanonicalEvent::of(event));
    }

    /// [`LedgerVerifier::check`] of an event read in canonical form.
    pub fn check_canonical(&mut self, event: &CanonicalEvent) {
        self.checked += 1;
        match self.streams.get_mut(&event.stream_id) {
            Some(verifier) => verifier.check_canonical(event),
            None => {
                let mut verifier = ChainVerifier::new();
                verifier.check_canonical(event);
                self.streams.insert(event.stream_id.clone(), verifier);
            }
        }
    }

    /// The verdict: ok when every stream checked out; otherwise the lowest
    /// broken position and why.
    pub fn finish(self) -> Verification {
        let broken = self
            .streams
            .into_values()
            .map(ChainVerifier::finish)
            .filter(|v| !v.ok)
            .min_by_key(|v| v.first_broken_position);
        Verification {
            ok: broken.is_none(),
            checked_events: self.checked,
            first_broken_position: broken.as_ref().and_then(|b| b.first_broken_position),
            reason: broken.and_then(|b| b.reason),
        }
    }
}

/// Verifies an excerpt of the ledger (an export), without the database:
/// every event's hash against its content, and consecutive events of a
/// stream against each other (versions follow, `prev_hash` is the previous
/// hash). A stream's first event in the excerpt links to an event outside
/// it, unless it is version 0, whose `prev_hash` must be the genesis hash.
#[derive(Debug, Default)]
pub struct ExcerptVerifier {
    streams: std::collections::HashMap<crate::StreamId, (u64, [u8; 32])>,
    checked: u64,
    broken: Option<(Position, String)>,
}

impl ExcerptVerifier {
    /// An empty verifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next event of the excerpt (in position order).
    pub fn check(&mut self, event: &RecordedEvent) {
        if self.broken.is_some() {
            return;
        }
        self.checked += 1;
        let problem = match self.streams.get(&event.stream_id) {
            Some((version, _)) if event.stream_version != version + 1 => Some(format!(
                "stream version {} follows {version}",
                event.stream_version
            )),
            Some((_, hash)) if event.prev_hash != *hash => {
                Some("prev_hash does not match the previous event's hash".to_string())
            }
            None if event.stream_version == 0 && event.prev_hash != GENESIS_HASH => {
                Some("the first event of a stream must chain from the genesis hash".to_string())
            }
            _ if event.hash_version != HASH_VERSION => {
                Some(format!("unknown hash version {}", event.hash_version))
            }
            _ if recompute_hash(event) != event.hash => {
                Some("content does not match its hash".to_string())
            }
            _ => None,
        };
        match problem {
            Some(reason) => self.broken = Some((event.global_position, reason)),
            None => {
                self.streams
                    .insert(event.stream_id.clone(), (event.stream_version, event.hash));
            }
        }
    }

    /// The verdict.
    pub fn finish(self) -> Verification {
        Verification::of(self.checked, self.broken)
    }
}

/// Verifies one stream's events, given in version order.
pub fn verify_events<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Verification {
    let mut verifier = ChainVerifier::new();
    events.into_iter().for_each(|e| verifier.check(e));
    verifier.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canonical(v: &Value) -> String {
        String::from_utf8(canonical_json(v)).unwrap()
    }

    #[test]
    fn canonical_sorts_keys_and_normalises_numbers() {
        let v: Value = serde_json::from_str(
            r#"{"b":1e2,"a":{"z":-0.0,"y":[1.50,"é"]},"c":12345678901234567890}"#,
        )
        .unwrap();
        assert_eq!(
            canonical(&v),
            r#"{"a":{"y":[1.5,"é"],"z":0},"b":100,"c":12345678901234567890}"#
        );
    }

    /// jsonb prints numbers without exponents; the canonical form of what it
    /// prints must equal the canonical form of what was sent.
    #[test]
    fn canonical_numbers_survive_exponent_expansion() {
        let huge = format!("1{}", "0".repeat(300));
        for (sent, printed_by_jsonb) in [
            ("1e16", "10000000000000000"),
            ("1.5e17", "150000000000000000"),
            ("-9.2e18", "-9200000000000000000"),
            ("1.8e19", "18000000000000000000"),
            ("1e300", huge.as_str()),
            ("1.5e-7", "0.00000015"),
            ("-0.0", "0"),
        ] {
            let a: Value = serde_json::from_str(sent).unwrap();
            let b: Value = serde_json::from_str(printed_by_jsonb).unwrap();
            assert_eq!(canonical(&a), canonical(&b), "{sent}");
        }
    }

    #[test]
    fn canonical_escapes_control_characters_and_keeps_korean() {
        assert_eq!(
            canonical(&json!({"텍스트": "줄\n바꿈\""})),
            "{\"텍스트\":\"줄\\n바꿈\\\"\"}"
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[^\u{0}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[^\u{0}]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Reparsing the canonical text gives a value with the same canonical text:
        /// the property that lets a chain verify after any faithful JSON round trip.
        #[test]
        fn canonical_form_is_a_fixed_point(v in arb_json()) {
            let once = canonical(&v);
            let reparsed: Value = serde_json::from_str(&once).unwrap();
            prop_assert_eq!(canonical(&reparsed), once);
        }

        /// Canonicalising the text directly gives the bytes of parsing it
        /// into a `Value` first, whatever the key order, spacing and escapes.
        #[test]
        fn canonical_from_text_equals_canonical_from_value(v in arb_json(), seed in any::<u64>()) {
            let text = scrambled(&v, seed);
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(
                canonical_from_slice(text.as_bytes()).unwrap(),
                canonical_json(&parsed),
                "{}", text
            );
        }
    }

    /// `v` as JSON text with object keys in a seed-chosen order, spaces and
    /// escaped keys, as other writers (and jsonb) produce.
    fn scrambled(v: &Value, seed: u64) -> String {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                let n = entries.len().max(1);
                entries.rotate_left((seed as usize) % n);
                if seed % 3 == 0 {
                    entries.reverse();
                }
                let parts: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| {
                        let key = if seed % 2 == 0 {
                            serde_json::to_string(k).unwrap()
                        } else {
                            // Every UTF-16 unit as a \u escape.
                            let escaped: String =
                                k.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
                            format!("\"{escaped}\"")
                        };
                        format!("{key} : {}", scrambled(v, seed.rotate_left(7)))
                    })
                    .collect();
                format!("{{ {} }}", parts.join(" , "))
            }
            Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|i| scrambled(i, seed.rotate_left(3)))
                    .collect();
                format!("[ {} ]", parts.join(" ,"))
            }
            other => serde_json::to_string(other).unwrap(),
        }
    }

    #[test]
    fn canonical_from_text_handles_repeated_keys_numbers_and_escapes() {
        for text in [
            r#"{"b":1,"a":2,"b":3}"#,
            r#"{"a":{"z":1e2,"y":-0,"x":1.50,"w":18446744073709551616}}"#,
            r#"["\u00e9\n\"",{"":null},[],{}]"#,
            r#"{"k":[1,2,{"b":true,"a":false}],"é":"\ud83d\ude00"}"#,
        ] {
            let parsed: Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                String::from_utf8(canonical_from_slice(text.as_bytes()).unwrap()).unwrap(),
                String::from_utf8(canonical_json(&parsed)).unwrap(),
                "{text}"
            );
        }
        assert!(canonical_from_slice(br#"{"a":1} x"#).is_err());
    }
}
