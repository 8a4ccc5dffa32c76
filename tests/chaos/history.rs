//! The campaign's records: what each client operation asked, of which master, when, and what it
//! was told; which faults the nemesis injected and healed; and the final state read after the
//! heal. Plain data with serde, so a run's history can be written out and checked again.
//!
//! Invariant: an outcome records only what the client was told. `Unknown` means the client
//! cannot tell whether the request took effect (it went out and no answer came back); a request
//! that never reached a master (its socket refused the connection) is `Refused` with kind
//! `unreachable`, because it cannot have had any effect.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Milliseconds since the start of the campaign (monotonic).
pub type Millis = u64;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// `vsmclient connect`: reconnect to the user's live session or create one.
    Connect { new: bool },
    /// `vsmclient terminate ID`.
    Terminate { session: String },
    /// `tlctl session terminate --user USER -y`.
    TerminateUser,
}

/// What the client was told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A session: created (`reconnected == false`) or an existing one reconnected.
    Given { session: String, agent: String, display: u32, reconnected: bool },
    /// Sessions reported ended (`terminated`, `abandoned`), pending (ended once the agent answers
    /// again), unknown (the agent may or may not have ended it; still listed) or failed (not
    /// ended, and never will be by this request).
    Terminated {
        ended: Vec<String>,
        pending: Vec<String>,
        #[serde(default)]
        unknown: Vec<String>,
        failed: Vec<String>,
    },
    /// An error reply, or no connection to the master at all (`unreachable`): no effect.
    Refused { kind: String, message: String },
    /// No answer in time, or the connection broke after the request went out.
    Unknown { reason: String },
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub client: u32,
    pub user: String,
    /// The master whose socket was used.
    pub master: String,
    pub invoked: Millis,
    pub completed: Millis,
    #[serde(flatten)]
    pub kind: OpKind,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Op {
    /// Could this operation have ended session `id` of `user`? (Its outcome says so, or is
    /// unknown and the operation targeted that session or its user.)
    pub fn may_have_ended(&self, id: &str, user: &str) -> bool {
        let targets = match &self.kind {
            OpKind::Connect { .. } => false,
            OpKind::Terminate { session } => session == id,
            OpKind::TerminateUser => self.user == user,
        };
        match &self.outcome {
            Outcome::Terminated { ended, pending, unknown, .. } => {
                ended.iter().chain(pending).chain(unknown).any(|s| s == id)
            }
            Outcome::Unknown { .. } => targets,
            Outcome::Given { .. } | Outcome::Refused { .. } => false,
        }
    }

    /// Was the client told that session `id` ended (or will end)?
    pub fn told_ended(&self, id: &str) -> bool {
        matches!(&self.outcome, Outcome::Terminated { ended, pending, .. } if ended.iter().chain(pending).any(|s| s == id))
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub n: u32,
    /// The kind (`kill-server`, `pause-agent`, ...).
    pub kind: String,
    /// The node it hit.
    pub target: String,
    pub started: Millis,
    /// When it was healed (`None`: not yet, or an instant fault).
    pub healed: Option<Millis>,
    /// What the lab said when the fault could not be applied (then it does not count).
    pub skipped: Option<String>,
}

/// A desktop process found running on an agent (its `VSM_SESSION_ID`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub session: String,
    pub agent: String,
    pub user: String,
    pub pids: Vec<i32>,
}

/// A session as a master lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Listed {
    pub session: String,
    pub user: String,
    pub agent: String,
    pub display: u32,
}

/// What a master reported at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterState {
    pub name: String,
    /// `None`: the master did not answer.
    pub sessions: Option<Vec<Listed>>,
    pub digest: Option<String>,
    pub ready: Option<bool>,
    pub link: Option<String>,
}

/// Everything the checker judges after heal and convergence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    pub masters: Vec<MasterState>,
    pub running: Vec<Running>,
    /// Panic lines found in daemon logs: file → lines.
    pub panics: BTreeMap<String, Vec<String>>,
    /// Did the convergence wait end with everything agreeing?
    pub converged: bool,
    pub max_sessions_per_user: u32,
}
