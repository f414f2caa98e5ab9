//! Language-model agents: the analyst, the gatekeeper or the ethics
//! reviewer served by a model behind an OpenAI-compatible chat-completions
//! endpoint (OpenAI, Ollama, vLLM, llama.cpp's server). The model sees what
//! an external worker would see (the role's context) and is asked, at
//! temperature 0, for a decision constrained by the role's JSON Schema; its
//! answer is checked like any external decision. Whatever happens, a
//! [`ModelCall`] records what was sent (prompt version and SHA-256) and what
//! came back, so that replay never asks the model again. The API key is
//! sent in a header and never recorded or logged.

use std::fmt;
use std::time::{Duration, Instant};

use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::{ModelCall, Text};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::Clock;

/// The API every supported server speaks.
pub const PROVIDER: &str = "openai-compatible";

/// Most retries a configuration may ask for.
pub const MAX_RETRIES: u8 = 5;

/// Largest answer body read from the endpoint.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// First pause before a retry after a `5xx` or a refused connection;
/// doubles each time.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Where the model is and how it is asked.
#[derive(Clone)]
pub struct LlmConfig {
    /// The API's base, e.g. `https://api.openai.com/v1` or
    /// `http://127.0.0.1:11434/v1` (Ollama); `/chat/completions` is added.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer …`; never recorded or logged.
    pub api_key: Option<String>,
    /// Longest wait for one answer.
    pub timeout: Duration,
    pub max_tokens: u32,
    /// Further requests after a `429`, a `5xx` or a refused connection
    /// (at most [`MAX_RETRIES`]); each waits at most `timeout`, so a
    /// decision waits at most `(2 × retries + 1) × timeout` for the model.
    pub retries: u8,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:11434/v1".into(),
            model: "llama3.1".into(),
            api_key: None,
            timeout: Duration::from_secs(30),
            max_tokens: 1024,
            retries: 2,
        }
    }
}

impl fmt::Debug for LlmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_tokens", &self.max_tokens)
            .field("retries", &self.retries)
            .finish()
    }
}

/// The prompt template of `role`: its version and the system message.
pub fn prompt(role: AgentRole) -> (String, &'static str) {
    let agent = role.reference_agent();
    let text = match role {
        AgentRole::Analyst => {
            "You are Sena, the analyst of a workflow service. Read the request (and the input \
             document, if any) in the context and break it into subtasks that the listed tools can \
             run: give each an id, a short title, the name of one listed tool, and the ids of the \
             subtasks whose output it needs (no cycles). On a revision round, follow the \
             gatekeeper's feedback. Give your confidence (0 to 1) and a short rationale."
        }
        AgentRole::Gatekeeper => {
            "You are Lubit, the gatekeeper of a workflow service. Judge the analysis in the \
             context against the request: APPROVE a sound, safe plan; REVISE one that can be fixed \
             (only while revisionsLeft is above 0); REJECT a harmful or impossible request; \
             ESCALATE to a person when unsure. Give a priority, a risk (0 to 1), your reasons and \
             a short rationale."
        }
        _ => {
            "You are RUNE, the ethics reviewer of a workflow service. Review what was planned, \
             decided and produced in the context. Score transparency, collaboration, autonomy and \
             fairness from 0 to 1, say whether the result passes, list any findings and give a \
             short rationale."
        }
    };
    (format!("{agent}-llm/1"), text)
}

/// A request ready to send, with the record of it so far.
pub struct Prepared {
    body: Value,
    pub call: ModelCall,
}

/// What asking the model gave: its decision (a JSON value, still to be
/// checked against the schema) or why there is none, and the record of
/// the exchange (`fallback` still false).
pub struct Asked {
    pub decision: Result<Value, String>,
    pub call: ModelCall,
}

/// A client of one endpoint.
pub struct LlmAgent {
    config: LlmConfig,
    http: reqwest::Client,
    url: String,
}

impl LlmAgent {
    pub fn new(config: LlmConfig) -> Self {
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .expect("an HTTP client with default TLS settings");
        Self { config, http, url }
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// What a decision made by this model under `role`'s prompt depends
    /// on, for the policy's fingerprint (the key is not part of it).
    pub fn policy_basis(&self, role: AgentRole) -> impl Serialize {
        let (version, text) = prompt(role);
        json!({
            "provider": PROVIDER,
            "base_url": self.config.base_url,
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "temperature": 0,
            "prompt_version": version,
            "prompt": text,
        })
    }

    /// Asks for `role`'s decision on `context`, constrained by `schema`.
    pub async fn ask(
        &self,
        role: AgentRole,
        context: &Value,
        schema: &Value,
        clock: &dyn Clock,
    ) -> Asked {
        self.send(self.prepare(role, context, schema), clock).await
    }

    /// The request for `role`'s decision on `context`, and the record of
    /// it so far (its prompt's version and hash).
    pub fn prepare(&self, role: AgentRole, context: &Value, schema: &Value) -> Prepared {
        let (version, system) = prompt(role);
        let messages = json!([
            { "role": "system", "content": system },
            { "role": "user", "content": format!(
                "Decide on this context. Answer with one JSON object that matches the schema.\n\n{context}"
            ) },
        ]);
        let sent = serde_json::to_vec(&messages).expect("JSON serialises");
        let body = json!({
            "model": self.config.model,
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": format!("{}_decision", role.as_str().to_lowercase()),
                    "schema": schema,
                    "strict": false,
                },
            },
        });
        let call = ModelCall {
            provider: PROVIDER.into(),
            endpoint: self.config.base_url.clone(),
            model: self.config.model.clone(),
            prompt_version: version,
            prompt_sha256: hex::encode(Sha256::digest(&sent)),
            answer: Text::new(""),
            input_tokens: None,
            output_tokens: None,
            latency_ms: 0,
            requests: 0,
            fallback: false,
            fallback_reason: None,
            reused_from: None,
            cache_key: None,
        };
        Prepared { body, call }
    }

    /// Sends a prepared request.
    pub async fn send(&self, prepared: Prepared, clock: &dyn Clock) -> Asked {
        let Prepared { body, mut call } = prepared;
        let started = Instant::now();
        let decision = self.exchange(&body, &mut call, clock).await;
        call.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Asked { decision, call }
    }

    /// The decision in an answer recorded earlier (a cache hit at
    /// `position`): nothing is sent.
    pub fn reuse(prepared: Prepared, answer: &str, position: u64) -> Asked {
        let mut call = prepared.call;
        call.answer = Text::new(answer);
        call.reused_from = Some(position);
        Asked {
            decision: decision_in(answer),
            call,
        }
    }

    /// Sends `body` until an answer comes or the retries are spent.
    async fn exchange(
        &self,
        body: &Value,
        call: &mut ModelCall,
        clock: &dyn Clock,
    ) -> Result<Value, String> {
        let mut pause = RETRY_PAUSE;
        loop {
            call.requests += 1;
            let retries_left = call.requests <= self.config.retries;
            let mut request = self.http.post(&self.url).json(body);
            if let Some(key) = &self.config.api_key {
                request = request.bearer_auth(key);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if e.is_timeout() => {
                    return Err(format!(
                        "no answer within {} ms",
                        self.config.timeout.as_millis()
                    ))
                }
                Err(e) if retries_left && (e.is_connect() || e.is_request()) => {
                    clock.sleep(pause).await;
                    pause = (pause * 2).min(self.config.timeout);
                    continue;
                }
                // The error names the URL, never the key (a header).
                Err(e) => return Err(format!("the endpoint could not be reached: {e}")),
            };
            let status = response.status();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(pause, Duration::from_secs);
                if !retries_left || wait > self.config.timeout {
                    return Err(format!(
                        "rate-limited (429) after {} request(s)",
                        call.requests
                    ));
                }
                clock.sleep(wait).await;
                pause = (pause * 2).min(self.config.timeout);
                continue;
            }
            if status.is_server_error() && retries_left {
                clock.sleep(pause).await;
                pause = (pause * 2).min(self.config.timeout);
                continue;
            }
            let text = read_capped(response).await?;
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                // Some servers quote the key they refused: none of the body.
                return Err(format!("the endpoint refused the credentials ({status})"));
            }
            if !status.is_success() {
                let excerpt: String = text.chars().take(200).collect();
                return Err(format!("the endpoint answered {status}: {excerpt}"));
            }
            return self.decision(&text, call);
        }
    }

    /// The decision in a chat-completions answer.
    fn decision(&self, text: &str, call: &mut ModelCall) -> Result<Value, String> {
        let answer: Value = serde_json::from_str(text)
            .map_err(|e| format!("the endpoint's answer is not JSON: {e}"))?;
        call.input_tokens = answer["usage"]["prompt_tokens"].as_u64();
        call.output_tokens = answer["usage"]["completion_tokens"].as_u64();
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .ok_or("the answer has no message content")?;
        call.answer = Text::new(content);
        decision_in(content)
    }
}

/// The decision in a model's answer: one JSON object.
fn decision_in(content: &str) -> Result<Value, String> {
    serde_json::from_str::<Value>(content)
        .map_err(|e| format!("the model's answer is not JSON: {e}"))
        .and_then(|decision| {
            if decision.is_object() {
                Ok(decision)
            } else {
                Err("the model's answer is not a JSON object".into())
            }
        })
}

/// The response's body, at most [`MAX_RESPONSE_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("the answer broke off: {e}"))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "the answer is not UTF-8".to_string())
}
