//! The response byte budget, kept while a response is built rather than
//! checked once it is: a replay of many steps, each with the state and its
//! subtask outputs, would otherwise be assembled whole in memory before it
//! could be refused. Every resolved field is charged its key and, for a
//! scalar, its value; past the budget the rest of the response is not
//! resolved at all and the whole answer becomes one `BAD_INPUT` error.
//! A subscription's budget applies to each message it sends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextResolve, NextSubscribe,
    ResolveInfo,
};
use async_graphql::{QueryPathSegment, Response, ServerError, ServerResult, Value};
use futures::stream::BoxStream;
use futures::StreamExt;

use super::error::Code;

/// The factory registered with the schema: one meter per request.
pub(super) struct ResponseBudget {
    pub(super) bytes: usize,
}

impl ExtensionFactory for ResponseBudget {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(Meter(Arc::new(Spent {
            budget: self.bytes,
            used: AtomicUsize::new(0),
            over: AtomicBool::new(false),
        })))
    }
}

struct Spent {
    budget: usize,
    used: AtomicUsize,
    over: AtomicBool,
}

impl Spent {
    fn refusal(&self) -> Response {
        let mut error = ServerError::new(
            format!(
                "the response would exceed its budget, at most {} bytes: ask for fewer \
                 fields, a smaller page or an earlier atPosition",
                self.budget
            ),
            None,
        );
        let mut extensions = async_graphql::ErrorExtensionValues::default();
        extensions.set("code", Code::BadInput.as_str());
        error.extensions = Some(extensions);
        Response::from_errors(vec![error])
    }

    /// Settles one finished response: a refusal if it went over, and the
    /// meter reset for the next (a subscription's next message).
    fn settle(&self, response: Response) -> Response {
        self.used.store(0, Ordering::Relaxed);
        if self.over.swap(false, Ordering::Relaxed) {
            self.refusal()
        } else {
            response
        }
    }
}

struct Meter(Arc<Spent>);

/// About what `value` adds to the JSON text, not counting the objects and
/// lists whose fields are charged on their own.
fn size_of(value: &Value, return_type: &str) -> usize {
    let base = return_type.trim_matches(|c| matches!(c, '[' | ']' | '!'));
    match value {
        Value::String(s) => s.len() + 2,
        Value::Enum(name) => name.len() + 2,
        Value::Number(_) => 20,
        Value::Null | Value::Boolean(_) => 5,
        Value::Binary(bytes) => bytes.len() * 2,
        // A JSON scalar is a whole tree that no field resolver charges.
        Value::List(_) | Value::Object(_) if base == "JSON" => {
            value.clone().into_json().map_or(0, |j| j.to_string().len())
        }
        Value::List(_) | Value::Object(_) => 2,
    }
}

#[async_trait::async_trait]
impl Extension for Meter {
    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let response = next.run(ctx, operation_name).await;
        self.0.settle(response)
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let spent = self.0.clone();
        next.run(ctx, stream)
            .map(move |response| spent.settle(response))
            .boxed()
    }

    async fn resolve(
        &self,
        ctx: &ExtensionContext<'_>,
        info: ResolveInfo<'_>,
        next: NextResolve<'_>,
    ) -> ServerResult<Option<Value>> {
        let spent = &self.0;
        if spent.over.load(Ordering::Relaxed) {
            // Already refused: resolve nothing more (a list item must still
            // answer a value).
            return Ok(Some(Value::Null));
        }
        let key = match info.path_node.segment {
            QueryPathSegment::Index(_) => 1,
            QueryPathSegment::Name(name) => info.alias.unwrap_or(name).len() + 4,
        };
        let return_type = info.return_type;
        let value = next.run(ctx, info).await?;
        let cost = key + value.as_ref().map_or(5, |v| size_of(v, return_type));
        let used = spent.used.fetch_add(cost, Ordering::Relaxed) + cost;
        if used > spent.budget {
            spent.over.store(true, Ordering::Relaxed);
            return Ok(Some(Value::Null));
        }
        Ok(value)
    }
}
