//! What each role may call: one table, [`ACCESS`], with an entry for every
//! root field of the schema (a test enumerates the schema and fails on a
//! field without one), enforced by [`authorize`] before an operation runs,
//! at both doors: `POST /graphql` and every operation on a WebSocket.
//!
//! It reads the parsed document, so it sees every root field of queries,
//! mutations and subscriptions alike, through fragments and aliases, and
//! refuses the whole request (nothing runs, nothing is written) when any
//! field is not allowed. It also caps root fields and aliases per
//! operation, so that one request cannot ask for the same expensive field
//! a thousand times. (It is not an async-graphql extension: any extension
//! makes the executor wrap every field's resolution, which made a page of
//! 100 workflows more than ten times slower.) Which rows a caller sees (its
//! tenant, its own workflows) is for the resolvers.

use std::collections::HashSet;

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
};
use async_graphql::{ErrorExtensions, ServerError, ServerResult};

use super::{Principal, Role, Roles};

/// Who may call a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated caller, `agent` included (`me`, `__typename`,
    /// introspection where it is enabled).
    Anyone,
    /// viewer, submitter, operator, auditor, admin.
    Read,
    /// submitter, admin.
    Submit,
    /// submitter (its own workflows: the resolver checks), operator, admin.
    Cancel,
    /// operator, admin.
    Decide,
    /// auditor, admin.
    Audit,
    /// admin.
    Admin,
    /// agent (external workers), admin.
    Work,
}

impl Access {
    /// The roles that may call a field with this access.
    pub fn roles(self) -> &'static [Role] {
        use Role::*;
        match self {
            Access::Anyone => &[Viewer, Submitter, Operator, Auditor, Admin, Agent],
            Access::Read => &[Viewer, Submitter, Operator, Auditor, Admin],
            Access::Submit => &[Submitter, Admin],
            Access::Cancel => &[Submitter, Operator, Admin],
            Access::Decide => &[Operator, Admin],
            Access::Audit => &[Auditor, Admin],
            Access::Admin => &[Admin],
            Access::Work => &[Agent, Admin],
        }
    }

    /// Whether a caller holding `roles` may call the field.
    pub fn allows(self, roles: Roles) -> bool {
        self.roles().iter().any(|r| roles.has(*r))
    }
}

/// Every root field: (operation type, field, access). The one place that
/// says who may call what.
pub const ACCESS: &[(&str, &str, Access)] = &[
    ("Query", "me", Access::Anyone),
    ("Query", "workflow", Access::Read),
    ("Query", "workflows", Access::Read),
    ("Query", "workflowCounts", Access::Read),
    ("Query", "projectionLag", Access::Read),
    ("Query", "events", Access::Read),
    ("Query", "agentMetrics", Access::Read),
    ("Query", "auditTrail", Access::Audit),
    ("Query", "replay", Access::Audit),
    ("Query", "verifyWorkflow", Access::Audit),
    ("Query", "verifyLedger", Access::Audit),
    ("Query", "ledgerDigest", Access::Audit),
    ("Query", "ledgerKeys", Access::Audit),
    ("Query", "inclusionProof", Access::Audit),
    ("Query", "consistencyProof", Access::Audit),
    ("Query", "workflowReceipt", Access::Audit),
    ("Query", "agentDecisionSchema", Access::Anyone),
    ("Mutation", "submitWorkflow", Access::Submit),
    ("Mutation", "cancelWorkflow", Access::Cancel),
    ("Mutation", "decideEscalation", Access::Decide),
    ("Mutation", "forgetSubject", Access::Admin),
    ("Mutation", "claimAgentTask", Access::Work),
    ("Mutation", "renewAgentTask", Access::Work),
    ("Mutation", "failAgentTask", Access::Work),
    ("Mutation", "submitAgentDecision", Access::Work),
    ("Mutation", "claimToolCall", Access::Work),
    ("Mutation", "completeToolCall", Access::Work),
    ("Subscription", "workflowProgress", Access::Read),
    ("Subscription", "workflowEvents", Access::Read),
    ("Subscription", "agentTasks", Access::Work),
];

/// The access of root field `field` of `operation` (`Query`, `Mutation`,
/// `Subscription`); `None` for a field the table does not name, which is
/// refused.
pub fn access_of(operation: &str, field: &str) -> Option<Access> {
    if matches!(field, "__typename" | "__schema" | "__type") {
        return Some(Access::Anyone);
    }
    ACCESS
        .iter()
        .find(|(o, f, _)| *o == operation && *f == field)
        .map(|(_, _, a)| *a)
}

/// Caps on the shape of one operation.
#[derive(Debug, Clone, Copy)]
pub struct ShapeLimits {
    /// Root fields per operation (aliases of one field count apiece).
    pub max_root_fields: usize,
    /// Aliased fields anywhere in an operation.
    pub max_aliases: usize,
}

impl Default for ShapeLimits {
    fn default() -> Self {
        Self {
            max_root_fields: 10,
            max_aliases: 30,
        }
    }
}

/// Refuses `request` unless `principal` may call every root field of it
/// and it keeps to `limits`; then the request carries `principal` for the
/// resolvers. The document is parsed here once and kept in the request. One
/// that does not parse runs nothing: the executor reports why.
pub fn authorize(
    mut request: async_graphql::Request,
    principal: &Principal,
    limits: ShapeLimits,
) -> Result<async_graphql::Request, Box<async_graphql::Response>> {
    if let Ok(document) = request.parsed_query() {
        check(document, principal, limits)
            .map_err(|e| Box::new(async_graphql::Response::from_errors(vec![e])))?;
    }
    Ok(request.data(principal.clone()))
}

fn refusal(code: &'static str, message: String) -> ServerError {
    async_graphql::Error::new(message)
        .extend_with(|_, e| e.set("code", code))
        .into_server_error(Default::default())
}

/// Refuses `document` unless `principal` may call every root field of
/// every operation in it and each operation keeps to `limits`.
pub fn check(
    document: &ExecutableDocument,
    principal: &Principal,
    limits: ShapeLimits,
) -> ServerResult<()> {
    let operations: Vec<_> = match &document.operations {
        DocumentOperations::Single(op) => vec![op],
        DocumentOperations::Multiple(ops) => ops.values().collect(),
    };
    for operation in operations {
        let kind = match operation.node.ty {
            OperationType::Query => "Query",
            OperationType::Mutation => "Mutation",
            OperationType::Subscription => "Subscription",
        };
        let mut walk = Walk {
            document,
            roots: Vec::new(),
            aliases: 0,
            visited: 0,
            limits,
        };
        walk.selections(
            &operation.node.selection_set.node,
            true,
            &mut HashSet::new(),
        )?;
        // GraphQL's "single root field" rule, which the executor does not
        // enforce: one subscription is one stream (and one byte budget).
        if kind == "Subscription" && walk.roots.len() != 1 {
            return Err(refusal(
                "BAD_INPUT",
                "a subscription selects exactly one root field".to_string(),
            ));
        }
        for field in &walk.roots {
            let access = access_of(kind, field).ok_or_else(|| {
                refusal(
                    "FORBIDDEN",
                    format!("{kind}.{field} has no access rule and is refused"),
                )
            })?;
            if !access.allows(principal.roles) {
                let needed: Vec<&str> = access.roles().iter().map(|r| r.as_str()).collect();
                return Err(refusal(
                    "FORBIDDEN",
                    format!(
                        "{field} needs one of the roles {}; this credential has {}",
                        needed.join(", "),
                        if principal.roles.is_empty() {
                            "none".to_string()
                        } else {
                            principal.roles.names().join(", ")
                        }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Most selections looked at in one operation (fragments expanded): a
/// bound on the guard's own work, whatever the document.
const MAX_VISITED: usize = 10_000;

struct Walk<'a> {
    document: &'a ExecutableDocument,
    roots: Vec<String>,
    aliases: usize,
    visited: usize,
    limits: ShapeLimits,
}

impl<'a> Walk<'a> {
    fn selections(
        &mut self,
        set: &'a SelectionSet,
        root: bool,
        spreading: &mut HashSet<&'a str>,
    ) -> ServerResult<()> {
        for item in &set.items {
            self.visited += 1;
            if self.visited > MAX_VISITED {
                return Err(refusal(
                    "BAD_INPUT",
                    format!("the operation selects more than {MAX_VISITED} fields"),
                ));
            }
            match &item.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    if field.alias.is_some() {
                        self.aliases += 1;
                        if self.aliases > self.limits.max_aliases {
                            return Err(refusal(
                                "BAD_INPUT",
                                format!(
                                    "at most {} aliases per operation",
                                    self.limits.max_aliases
                                ),
                            ));
                        }
                    }
                    if root {
                        self.roots.push(field.name.node.to_string());
                        if self.roots.len() > self.limits.max_root_fields {
                            return Err(refusal(
                                "BAD_INPUT",
                                format!(
                                    "at most {} root fields per operation",
                                    self.limits.max_root_fields
                                ),
                            ));
                        }
                    }
                    self.selections(&field.selection_set.node, false, spreading)?;
                }
                Selection::InlineFragment(fragment) => {
                    self.selections(&fragment.node.selection_set.node, root, spreading)?;
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    // A fragment that spreads itself is for validation to
                    // refuse; here it is simply not followed again.
                    if let Some(fragment) = self.document.fragments.get(name) {
                        if spreading.insert(name) {
                            self.selections(&fragment.node.selection_set.node, root, spreading)?;
                            spreading.remove(name);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Method;

    fn principal(roles: &[Role]) -> Principal {
        Principal {
            subject: "apikey:test".into(),
            name: "test".into(),
            tenant: "default".into(),
            roles: roles.iter().copied().collect(),
            method: Method::ApiKey,
        }
    }

    fn verdict(query: &str, roles: &[Role]) -> Result<(), String> {
        let document = async_graphql::parser::parse_query(query).unwrap();
        check(&document, &principal(roles), ShapeLimits::default()).map_err(|e| {
            let code = e
                .extensions
                .as_ref()
                .and_then(|x| x.get("code").cloned())
                .map(|v| v.to_string())
                .unwrap_or_default();
            format!("{code}: {}", e.message)
        })
    }

    #[test]
    fn roles_reach_their_fields_and_no_further() {
        let q = "{ workflows { edges { cursor } } }";
        assert!(verdict(q, &[Role::Viewer]).is_ok());
        assert!(verdict(q, &[Role::Agent])
            .unwrap_err()
            .contains("FORBIDDEN"));
        let m = "mutation { forgetSubject(subjectId: \"x\") { destroyed } }";
        assert!(verdict(m, &[Role::Operator, Role::Auditor]).is_err());
        assert!(verdict(m, &[Role::Admin]).is_ok());
        assert!(verdict("{ verifyLedger { ok } }", &[Role::Submitter]).is_err());
        assert!(verdict("{ verifyLedger { ok } }", &[Role::Auditor]).is_ok());
        let s = "subscription { workflowEvents { position } }";
        assert!(verdict(s, &[Role::Agent]).is_err());
        assert!(verdict(s, &[Role::Viewer]).is_ok());
    }

    #[test]
    fn fragments_and_aliases_do_not_hide_a_field() {
        let hidden =
            "query { ...A } fragment A on Query { ... on Query { x: verifyLedger { ok } } }";
        assert!(verdict(hidden, &[Role::Viewer])
            .unwrap_err()
            .contains("FORBIDDEN"));
        // A fragment spreading itself is left for validation, not a hang.
        let cyclic = "query { ...A } fragment A on Query { me { name } ...A }";
        assert!(verdict(cyclic, &[Role::Viewer]).is_ok());
    }

    #[test]
    fn a_thousand_aliases_of_one_field_are_refused_before_anything_runs() {
        let fields: String = (0..1000)
            .map(|i| format!("v{i}: verifyLedger {{ ok }} "))
            .collect();
        let refused = verdict(&format!("{{ {fields} }}"), &[Role::Auditor]).unwrap_err();
        assert!(refused.contains("BAD_INPUT"), "{refused}");
        let roots: String = (0..11).map(|_| "me { name } ").collect();
        assert!(verdict(&format!("{{ {roots} }}"), &[Role::Viewer])
            .unwrap_err()
            .contains("root fields"));
    }

    #[test]
    fn a_subscription_selects_one_root_field() {
        let two = "subscription { a: workflowEvents { position } b: workflowEvents { position } }";
        assert!(verdict(two, &[Role::Viewer])
            .unwrap_err()
            .contains("exactly one root field"));
        let hidden = "subscription { workflowEvents { position } ...F } \
                      fragment F on SubscriptionRoot { workflowEvents { hash } }";
        assert!(verdict(hidden, &[Role::Viewer]).is_err());
    }

    #[test]
    fn unknown_root_fields_are_refused() {
        assert!(verdict("{ secrets }", &[Role::Admin])
            .unwrap_err()
            .contains("no access rule"));
    }
}
