//! Names that several crates spell: the stream prefix of workflows, the
//! privacy stream and its event, the agent roles and the reference agents
//! that serve them by default. One home, so that a rename is one change.

/// The prefix of every workflow stream id: `workflow-<uuid>`.
pub const STREAM_PREFIX: &str = "workflow-";

/// The stream recording destroyed data-subject keys.
pub const PRIVACY_STREAM: &str = "privacy-keys";

/// The event type on [`PRIVACY_STREAM`] recording one destroyed key.
pub const SUBJECT_KEY_DESTROYED: &str = "SubjectKeyDestroyed";

/// The four agent roles (design §5's `AgentRole`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AgentRole {
    Analyst,
    Gatekeeper,
    Executor,
    Ethics,
}

impl AgentRole {
    /// Every role, in the order a workflow meets them.
    pub const ALL: [Self; 4] = [
        Self::Analyst,
        Self::Gatekeeper,
        Self::Executor,
        Self::Ethics,
    ];

    /// The name of the built-in reference agent serving the role.
    pub fn reference_agent(self) -> &'static str {
        match self {
            Self::Analyst => "sena",
            Self::Gatekeeper => "lubit",
            Self::Executor => "gitcode",
            Self::Ethics => "rune",
        }
    }

    /// The role of a reference agent, by its name.
    pub fn of_agent(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.reference_agent() == name)
    }

    /// As stored and in the API: `ANALYST`, `GATEKEEPER`, `EXECUTOR`, `ETHICS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Analyst => "ANALYST",
            Self::Gatekeeper => "GATEKEEPER",
            Self::Executor => "EXECUTOR",
            Self::Ethics => "ETHICS",
        }
    }

    /// The inverse of [`AgentRole::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in AgentRole::ALL {
            assert_eq!(AgentRole::parse(role.as_str()), Some(role));
            assert_eq!(AgentRole::of_agent(role.reference_agent()), Some(role));
        }
        assert_eq!(AgentRole::parse("analyst"), None);
        assert_eq!(AgentRole::of_agent("worker-1"), None);
    }
}
