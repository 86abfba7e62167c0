//! The names a person reads on the page: the monitors and the steps (their display text is their
//! JSON too). Re-exported by [`super`], where the rest of the operation model lives.

use serde::{Deserialize, Serialize};

pub const SOURCE_MONITOR: &str = "Source Application Monitor";
pub const HELPER_MONITOR: &str = "MigHelper Application Monitor";
pub const TARGET_MONITOR: &str = "Target Application Monitor";
pub const RESTART_MONITOR: &str = "Re-Start Source Application Monitor";

/// A step of an operation. The variants are the steps the design names; their display text (and
/// their JSON) is what a person reads on the page. A name that arrives over the wire and is not one
/// of these fails to parse, so a handoff or a journal cannot name a step the actors do not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepId {
    #[serde(rename = "provisioning MigHelper on the target grid")]
    ProvisioningHelper,
    #[serde(rename = "pre-copying the source application's data to the target grid")]
    Precopying,
    #[serde(rename = "stopping the source application")]
    StoppingSource,
    #[serde(
        rename = "migrating the source application to the target grid as the target application"
    )]
    Migrating,
    #[serde(rename = "starting the target application")]
    StartingTarget,
    #[serde(rename = "re-starting the source application")]
    RestartingSource,
    #[serde(rename = "destroying the source application")]
    DestroyingSource,
    #[serde(rename = "stopping MigHelper")]
    StoppingHelper,
    #[serde(rename = "destroying MigHelper")]
    DestroyingHelper,
}

impl StepId {
    /// The step's name as the page shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            StepId::ProvisioningHelper => "provisioning MigHelper on the target grid",
            StepId::Precopying => "pre-copying the source application's data to the target grid",
            StepId::StoppingSource => "stopping the source application",
            StepId::Migrating => {
                "migrating the source application to the target grid as the target application"
            }
            StepId::StartingTarget => "starting the target application",
            StepId::RestartingSource => "re-starting the source application",
            StepId::DestroyingSource => "destroying the source application",
            StepId::StoppingHelper => "stopping MigHelper",
            StepId::DestroyingHelper => "destroying MigHelper",
        }
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for StepId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Names read back from JSON (tests, clients) compare with the steps directly.
impl PartialEq<StepId> for String {
    fn eq(&self, other: &StepId) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<StepId> for &str {
    fn eq(&self, other: &StepId) -> bool {
        *self == other.as_str()
    }
}

pub const PROVISIONING_HELPER: StepId = StepId::ProvisioningHelper;
/// MigHelper's first step with `precopy = on`, before the source is stopped.
pub const PRECOPYING: StepId = StepId::Precopying;
pub const STOPPING_SOURCE: StepId = StepId::StoppingSource;
pub const MIGRATING: StepId = StepId::Migrating;
pub const STARTING_TARGET: StepId = StepId::StartingTarget;
pub const RESTARTING_SOURCE: StepId = StepId::RestartingSource;
pub const DESTROYING_SOURCE: StepId = StepId::DestroyingSource;
pub const STOPPING_HELPER: StepId = StepId::StoppingHelper;
pub const DESTROYING_HELPER: StepId = StepId::DestroyingHelper;
