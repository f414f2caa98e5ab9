//! The response byte budget, kept while a response is built rather than
//! checked once it is: a replay of many steps, each with the state and its
//! subtask outputs, would otherwise be assembled whole in memory before it
//! could be refused.
//!
//! Only what can be large is charged, by the resolvers that produce it:
//! personal text (everything [`super::types::reveal`] opens: requests,
//! titles, outputs, rationales, findings), the items of every list that
//! grows with the data (subtasks, decisions, replay steps, audit entries),
//! and an event's payload and metadata. Everything else is a few bytes a
//! field within items already charged; the exact size of a finished answer
//! is checked once more before it is sent. Past the budget the charged
//! fields stop resolving and the whole answer becomes one `BAD_INPUT`
//! error. A subscription's budget applies to each message it sends.
//!
//! This is deliberately not an async-graphql extension: with any extension
//! registered, every field of every list item goes through the extension
//! chain, and a page of 100 workflows took 1.3× as long.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_graphql::{Context, Request, Response, ServerError};

use super::error::{error, Code};

/// One operation's meter: attached to its request, read by the resolvers
/// through the context, settled on each response.
#[derive(Clone)]
pub(crate) struct Meter(Arc<Spent>);

struct Spent {
    budget: usize,
    used: AtomicUsize,
    over: AtomicBool,
}

impl Meter {
    /// `request` with a fresh meter of `budget` bytes, and the meter.
    pub(crate) fn attach(request: Request, budget: usize) -> (Request, Self) {
        let meter = Self(Arc::new(Spent {
            budget,
            used: AtomicUsize::new(0),
            over: AtomicBool::new(false),
        }));
        (request.data(meter.clone()), meter)
    }

    fn message(&self) -> String {
        format!(
            "the response would exceed its budget, at most {} bytes: ask for fewer \
             fields, a smaller page or an earlier atPosition",
            self.0.budget
        )
    }

    /// Settles one finished response: a refusal if it went over, and the
    /// meter reset for the next (a subscription's next message).
    pub(crate) fn settle(&self, response: Response) -> Response {
        self.0.used.store(0, Ordering::Relaxed);
        if !self.0.over.swap(false, Ordering::Relaxed) {
            return response;
        }
        self.refusal()
    }

    /// [`Meter::settle`], then the exact size of the response as JSON
    /// against the budget: for a socket, where no later check sees the
    /// message before it is sent (HTTP checks the body it serialised).
    pub(crate) fn settle_exactly(&self, response: Response) -> Response {
        let response = self.settle(response);
        if agentledger_eventstore::json_len(&response) > self.0.budget {
            return self.refusal();
        }
        response
    }

    fn refusal(&self) -> Response {
        let mut refusal = ServerError::new(self.message(), None);
        let mut extensions = async_graphql::ErrorExtensionValues::default();
        extensions.set("code", Code::BadInput.as_str());
        refusal.extensions = Some(extensions);
        Response::from_errors(vec![refusal])
    }
}

/// Charges `bytes` to the operation's meter; an error once the budget is
/// spent (the field then resolves nothing, and [`Meter::settle`] replaces
/// the whole answer). Requests run without a meter (in-process callers)
/// are not charged.
pub(crate) fn charge(ctx: &Context<'_>, bytes: usize) -> async_graphql::Result<()> {
    let Some(meter) = ctx.data_opt::<Meter>() else {
        return Ok(());
    };
    let spent = &meter.0;
    if spent.over.load(Ordering::Relaxed) {
        return Err(error(Code::BadInput, meter.message()));
    }
    let used = spent.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if used > spent.budget {
        spent.over.store(true, Ordering::Relaxed);
        return Err(error(Code::BadInput, meter.message()));
    }
    Ok(())
}
