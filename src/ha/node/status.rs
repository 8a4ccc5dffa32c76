//! The HA node's status as `tlctl ha status` and the metrics show it: builds the API's
//! [`HaStatusView`] from the node's setup, the engine's status as the driver last published it,
//! and what only the node knows (a failed secure handshake, the last link drop); records that
//! drop; and names resyncs for the view and the metrics.
//!
//! Invariants: building the view never steps the engine or waits for its task (it reads the
//! published status; only the database is asked, for its status and digest); every moment it
//! shows (a resync, a link drop) is on this machine's wall clock, never the engine's monotonic
//! one; the agents' clock offsets are left empty, for the API to add from the broker.

use super::*;
use crate::model::LinkState;
use crate::proto::api::ResyncView;

impl HaNode {
    /// Records why an established link was dropped (it is logged by the caller).
    pub(super) fn note_drop(&self, reason: &str) {
        let mut d = self.last_drop.lock().unwrap_or_else(|p| p.into_inner());
        let drops = d.as_ref().map_or(0, |d| d.drops) + 1;
        *d = Some(LinkDropView { reason: reason.to_string(), at_ms: now_ms(), drops });
    }

    /// The status `tlctl ha status` shows, but for the agents' clock offsets (left empty):
    /// the broker knows them, and the API adds them. The database digest only if asked for.
    pub async fn status_view(&self, digest: Digest) -> HaStatusView {
        let role = *self.role.borrow();
        let db = self.db.status().await.ok();
        let db_digest = match digest {
            Digest::Include => self.db.digest().await.ok(),
            Digest::Omit => None,
        };
        let readiness = self.readiness();
        let mut v = HaStatusView {
            configured: self.cfg.ha.enabled,
            ready: readiness.is_ready(),
            readiness,
            reason: self.readiness_reason(),
            role,
            sync: self.cfg.ha.sync,
            sessions: db.as_ref().map(|d| d.sessions).unwrap_or(0),
            local_head: db.as_ref().map(|d| d.head.0).unwrap_or(0),
            db_digest,
            link: LinkState::Down,
            max_clock_offset_ms: u64::try_from(self.cfg.ha.max_clock_offset.as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        match &self.setup.mode {
            HaMode::Disabled => {}
            HaMode::Fallback { reason } => v.ha_off_reason = Some(reason.clone()),
            HaMode::Enabled { local, remote, via, .. } => {
                v.enabled = true;
                v.local_node = Some(local.0.clone());
                v.remote_node = Some(remote.0.clone());
                v.matched_by = Some(matched_by(via));
                let st = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(st) = st {
                    v.grace_left_ms = st.grace_left_ms;
                    v.link = st.link;
                    v.peer_acked = st.peer_acked.0;
                    v.peer_head = st.peer_head.0;
                    v.applied_of_peer = st.applied_of_peer.0;
                    v.lag_changes = st.lag_changes;
                    v.lag_ms = st.lag_ms;
                    v.config_digest_match = st.config_digest_match;
                    v.degraded = st.degraded;
                    v.degraded_reason = st.degraded_reason.clone();
                    v.clock_offset_ms = st.clock_offset_ms;
                    v.clock_offset_age_ms = st.clock_offset_at_ms.map(|at| engine_now().saturating_sub(at));
                    v.clock_offset_exceeded = st.clock_offset_exceeded;
                    if matches!(st.link, LinkState::Down | LinkState::Handshaking) {
                        let hs = self.handshake_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        v.link_error = hs.or_else(|| st.last_link_error.clone());
                    }
                    v.last_resync = st.last_resync.as_ref().map(resync_view);
                    v.last_link_drop = self.last_drop.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    v.last_resync_received = st.last_resync_received.as_ref().map(resync_view);
                }
            }
        }
        v
    }
}

pub(super) fn resync_kind(r: &engine::ResyncInfo) -> &'static str {
    match r.kind {
        engine::ResyncKind::Incremental => "incremental",
        engine::ResyncKind::Snapshot => "snapshot",
        engine::ResyncKind::SnapshotFile => "snapshot_file",
    }
}

pub(super) fn resync_direction(r: &engine::ResyncInfo) -> &'static str {
    match r.direction {
        engine::Direction::Received => "received",
        engine::Direction::Sent => "sent",
    }
}

fn resync_view(r: &engine::ResyncInfo) -> ResyncView {
    ResyncView {
        kind: resync_kind(r).into(),
        direction: resync_direction(r).into(),
        records: r.records,
        duration_ms: r.duration_ms,
        at_ms: engine_to_wall(r.at_ms),
    }
}

/// An engine time (see [`engine_now`]) on this machine's wall clock as it reads now.
fn engine_to_wall(at: u64) -> u64 {
    (at as i128 + now_ms() as i128 - engine_now() as i128).clamp(0, u64::MAX as i128) as u64
}
