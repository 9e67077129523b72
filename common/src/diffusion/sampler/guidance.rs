//! [`Guidance`]: how the data term steers the reverse process (DPS exact or approximate,
//! DDS proximal consistency, or none).

use serde::{Deserialize, Serialize};

/// How the DPS gradient ∇_{x_t} L is formed.
///
/// Its serde and command-line names are lowercase (`exact`, `approx`, `prox`): stored jobs
/// hold them. The proto enum `dmqsm.v1.Guidance` maps onto it in `dmqsm_proto::convert`
/// (jobs cannot ask for [`Guidance::None`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Guidance {
    /// Back through the score network (DPS): two model rounds per step (ε, then Jᵀv).
    Exact,
    /// Network Jacobian dropped, ∇ ≈ g/√ᾱ: one round per step.
    Approx,
    /// Proximal data consistency on x̂_0 by conjugate gradients (DDS, Chung, Lee & Ye,
    /// ICLR 2024), ξ as the data weight: one round per step, no VJP.
    Prox,
    /// No data term: samples the prior (used for tests and unconditional generation).
    #[cfg_attr(feature = "clap", value(skip))]
    None,
}

impl Guidance {
    /// The serde / command-line name (`exact`, `approx`, `prox`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Guidance::Exact => "exact",
            Guidance::Approx => "approx",
            Guidance::Prox => "prox",
            Guidance::None => "none",
        }
    }
}

impl std::fmt::Display for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
