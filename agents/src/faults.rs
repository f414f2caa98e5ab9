//! Named fault points for crash tests: a [`FaultPlan`] chosen by a seed
//! stops the runtime at one named point, on its n-th visit, as if the
//! process had died there (no lease released, nothing cleaned up), so that a
//! failing seed replays the same crash.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where a runtime can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// A workflow was claimed; nothing recorded yet.
    AfterClaim,
    /// Sena's analysis was recorded.
    AfterAnalysis,
    /// Lubit's verdict was recorded.
    AfterGate,
    /// A subtask's start was recorded; its tool has not run.
    AfterSubtaskStarted,
    /// A tool returned; its result is not recorded yet.
    BeforeSubtaskResult,
    /// The end of execution was recorded.
    AfterExecution,
    /// RUNE's review was recorded; the task is not removed yet.
    AfterReview,
}

impl FaultPoint {
    /// Every point, in the order a workflow passes them.
    pub const ALL: [FaultPoint; 7] = [
        Self::AfterClaim,
        Self::AfterAnalysis,
        Self::AfterGate,
        Self::AfterSubtaskStarted,
        Self::BeforeSubtaskResult,
        Self::AfterExecution,
        Self::AfterReview,
    ];
}

/// Die at `point` on its `visit`-th visit (1-based, counted over the
/// runtime's workflows).
#[derive(Debug)]
pub struct FaultPlan {
    pub point: FaultPoint,
    pub visit: u64,
    visits: AtomicU64,
}

impl FaultPlan {
    /// Die at `point` on its `visit`-th visit.
    pub fn at(point: FaultPoint, visit: u64) -> Self {
        Self {
            point,
            visit: visit.max(1),
            visits: AtomicU64::new(0),
        }
    }

    /// A plan derived from `seed` alone: one of the points, on one of its
    /// first `max_visit` visits.
    pub fn from_seed(seed: u64, max_visit: u64) -> Self {
        // splitmix64: a fixed, well-mixed function of the seed.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let point = FaultPoint::ALL[(z % FaultPoint::ALL.len() as u64) as usize];
        Self::at(point, 1 + (z >> 32) % max_visit.max(1))
    }

    /// Counts a visit of `point`; true when this is the one to die at.
    pub(crate) fn strikes(&self, point: FaultPoint) -> bool {
        point == self.point && self.visits.fetch_add(1, Ordering::SeqCst) + 1 == self.visit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_picks_the_same_fault() {
        let a = FaultPlan::from_seed(42, 10);
        let b = FaultPlan::from_seed(42, 10);
        assert_eq!((a.point, a.visit), (b.point, b.visit));
        assert!((1..=10).contains(&a.visit));
        let points: std::collections::HashSet<_> =
            (0..200).map(|s| FaultPlan::from_seed(s, 3).point).collect();
        assert_eq!(
            points.len(),
            FaultPoint::ALL.len(),
            "seeds reach every point"
        );
    }

    #[test]
    fn the_plan_strikes_once_on_the_chosen_visit() {
        let plan = FaultPlan::at(FaultPoint::AfterGate, 2);
        assert!(!plan.strikes(FaultPoint::AfterAnalysis));
        assert!(!plan.strikes(FaultPoint::AfterGate));
        assert!(plan.strikes(FaultPoint::AfterGate));
        assert!(!plan.strikes(FaultPoint::AfterGate));
    }
}
