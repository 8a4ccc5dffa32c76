//! The nemesis: injects faults into the lab on a schedule drawn from a seeded generator, heals
//! each after a drawn duration, and heals everything at the end.
//!
//! Faults (each with the lab command that makes it, see docs/reliability.md):
//! `kill-server` (kill -9 vsmserver, restarted at heal), `pause-server` and `pause-agent`
//! (SIGSTOP, SIGCONT at heal), `kill-agent` (kill -9 vsmagent, restarted at heal),
//! `peer-partition` (prohibit routes between the masters' addresses: the peer link breaks,
//! VRRP multicast still flows), `isolate-active` (the VIP holder's cable pulled),
//! `wipe-data` (vsmserver killed, its data directory emptied, restarted), `role-move`
//! (`ha notify MASTER|BACKUP` as keepalived's hook would send it; heal: the roles the VIP says),
//! `full-disk` (the master's data file system filled; heal: the filler removed), `clock-jump`
//! (a master's wall clock moved by up to two minutes either way through libfaketime, its
//! monotonic clock untouched; heal: back to true time; skipped unless the lab runs vsmserver
//! under libfaketime, `VSM_LAB_FAKETIME=1`).
//!
//! Faults overlap, at most `max_active` at a time, one per slot (a master's process, an agent's
//! process, the peer link, a master's cable, a master's disk, the roles). A data directory is
//! wiped only while no other fault is active and both masters stream with equal digests: wiping
//! a master whose peer does not hold every acknowledged change is a double failure, outside
//! what vsm promises. When a wipe is drawn, the nemesis lets the active faults run their course
//! and waits for the pair to catch up first.
//!
//! Invariant: every fault this module applied is healed by [`Nemesis::heal_all`], whatever
//! happened in between; a fault the lab could not apply is recorded as skipped, not counted.

use crate::history::FaultRecord;
use crate::lab::{Lab, AGENTS, MASTERS};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vsm::proto::api::{ApiReply, ApiRequest, VrrpState};

/// Every kind of fault, with its weight in the draw.
pub const KINDS: &[(&str, u32)] = &[
    ("kill-server", 12),
    ("pause-server", 12),
    ("pause-agent", 12),
    ("kill-agent", 6),
    ("peer-partition", 12),
    ("isolate-active", 12),
    ("wipe-data", 3),
    ("role-move", 12),
    ("full-disk", 8),
    ("clock-jump", 8),
];

struct Active {
    kind: &'static str,
    target: String,
    slot: String,
    heal_at: Instant,
    record: usize,
}

/// Nemesis parameters.
#[derive(Clone, Debug)]
pub struct Params {
    pub seed: u64,
    pub faults: u32,
    pub max_active: usize,
    /// Gap between two faults (ms), drawn uniformly.
    pub gap_ms: (u64, u64),
    /// How long a fault lasts (ms), drawn uniformly.
    pub duration_ms: (u64, u64),
}

pub struct Nemesis {
    lab: Arc<Lab>,
    rng: ChaCha8Rng,
    p: Params,
    active: Vec<Active>,
    pub records: Vec<FaultRecord>,
    epoch: Instant,
}

fn log(epoch: Instant, msg: &str) {
    eprintln!("chaos: {:>8.1} s  {msg}", epoch.elapsed().as_secs_f64());
}

impl Nemesis {
    pub fn new(lab: Arc<Lab>, p: Params, epoch: Instant) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(p.seed);
        Nemesis { lab, rng, p, active: Vec::new(), records: Vec::new(), epoch }
    }

    fn ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs the schedule: `faults` faults applied, each healed when due.
    pub async fn run(&mut self) {
        let mut applied = 0;
        let mut attempts = 0;
        while applied < self.p.faults && attempts < self.p.faults * 4 {
            attempts += 1;
            let gap = self.rng.gen_range(self.p.gap_ms.0..=self.p.gap_ms.1);
            let until = Instant::now() + Duration::from_millis(gap);
            // Heal what falls due during the gap, in order.
            loop {
                let next = self.active.iter().map(|a| a.heal_at).min();
                match next {
                    Some(t) if t <= until => {
                        tokio::time::sleep_until(t.into()).await;
                        self.heal_due().await;
                    }
                    _ => break,
                }
            }
            tokio::time::sleep_until(until.into()).await;
            if self.active.len() >= self.p.max_active {
                continue;
            }
            if self.inject().await {
                applied += 1;
            }
        }
        // The last faults run their course too.
        while let Some(t) = self.active.iter().map(|a| a.heal_at).min() {
            tokio::time::sleep_until(t.into()).await;
            self.heal_due().await;
        }
    }

    async fn heal_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.active.len()).filter(|&i| self.active[i].heal_at <= now).collect();
        for i in due.into_iter().rev() {
            let a = self.active.remove(i);
            self.heal(a).await;
        }
    }

    fn busy(&self, slot: &str) -> bool {
        self.active.iter().any(|a| a.slot == slot)
    }

    /// Draws and applies one fault; false when the draw fits no free slot or the lab refused.
    async fn inject(&mut self) -> bool {
        let total: u32 = KINDS.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.gen_range(0..total);
        let mut kind = KINDS[0].0;
        for (k, w) in KINDS {
            if roll < *w {
                kind = k;
                break;
            }
            roll -= w;
        }
        let master = MASTERS[self.rng.gen_range(0..2)].to_string();
        let agent = AGENTS[self.rng.gen_range(0..2)].to_string();
        let dur = Duration::from_millis(self.rng.gen_range(self.p.duration_ms.0..=self.p.duration_ms.1));
        let state = if self.rng.gen_bool(0.5) { VrrpState::Master } else { VrrpState::Backup };
        let jump: i64 = self.rng.gen_range(1..=120) * if self.rng.gen_bool(0.5) { 1 } else { -1 };
        let (target, slot) = match kind {
            "kill-server" | "pause-server" | "wipe-data" => (master.clone(), format!("process:{master}")),
            "pause-agent" | "kill-agent" => (agent.clone(), format!("process:{agent}")),
            "peer-partition" => ("masters".to_string(), "peer-link".to_string()),
            "isolate-active" => {
                let holders = self.lab.vip_holders().await;
                let Some(h) = holders.first() else { return false };
                (h.clone(), format!("cable:{h}"))
            }
            "role-move" => {
                (format!("{master}={}", if state == VrrpState::Master { "MASTER" } else { "BACKUP" }), "roles".into())
            }
            "full-disk" => (master.clone(), format!("disk:{master}")),
            "clock-jump" => (format!("{master} {jump:+}s"), format!("clock:{master}")),
            _ => return false,
        };
        if self.busy(&slot) {
            return false;
        }
        if kind == "wipe-data" {
            // A wipe needs a quiet pair in step: the active faults run their course first, then
            // the masters get up to 30 s to catch up with each other.
            while let Some(t) = self.active.iter().map(|a| a.heal_at).min() {
                tokio::time::sleep_until(t.into()).await;
                self.heal_due().await;
            }
            let until = Instant::now() + Duration::from_secs(30);
            while !self.pair_in_sync().await {
                if Instant::now() >= until {
                    log(self.epoch, "wipe-data drawn, but the masters did not get in step within 30 s; drawing again");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let n = self.records.len() as u32;
        let started = self.ms();
        let result = self.apply(kind, &master, &agent, &target, state, jump).await;
        let mut rec =
            FaultRecord { n, kind: kind.to_string(), target: target.clone(), started, healed: None, skipped: None };
        match result {
            Ok(()) => {
                log(self.epoch, &format!("fault {n}: {kind} {target} for {:.1} s", dur.as_secs_f64()));
                self.records.push(rec);
                let instant = kind == "wipe-data";
                if instant {
                    let last = self.records.len() - 1;
                    self.records[last].healed = Some(self.ms());
                } else {
                    self.active.push(Active {
                        kind,
                        target,
                        slot,
                        heal_at: Instant::now() + dur,
                        record: self.records.len() - 1,
                    });
                }
                true
            }
            Err(e) => {
                log(self.epoch, &format!("fault {n}: {kind} {target} not applied: {e:#}"));
                rec.skipped = Some(format!("{e:#}"));
                self.records.push(rec);
                false
            }
        }
    }

    /// Both masters answer, stream, and report the same digest.
    async fn pair_in_sync(&self) -> bool {
        let mut digests = Vec::new();
        for m in MASTERS {
            match self.lab.call(m, &ApiRequest::HaStatus, Duration::from_secs(3)).await {
                Ok(ApiReply::HaStatus { status })
                    if status.ready && status.link == vsm::model::LinkState::Streaming =>
                {
                    digests.push(status.db_digest.clone())
                }
                _ => return false,
            }
        }
        digests[0].is_some() && digests[0] == digests[1]
    }

    async fn apply(
        &self,
        kind: &str,
        master: &str,
        agent: &str,
        target: &str,
        state: VrrpState,
        jump: i64,
    ) -> Result<()> {
        let lab = &self.lab;
        match kind {
            "kill-server" => {
                lab.run(&["kill-daemon", master, "vsmserver", "KILL"]).await?;
            }
            "pause-server" => {
                lab.run(&["kill-daemon", master, "vsmserver", "STOP"]).await?;
            }
            "pause-agent" => {
                lab.run(&["kill-daemon", agent, "vsmagent", "STOP"]).await?;
            }
            "kill-agent" => {
                lab.run(&["kill-daemon", agent, "vsmagent", "KILL"]).await?;
            }
            "peer-partition" => {
                lab.ip(MASTERS[0], &["route", "add", "prohibit", &format!("{}/32", lab.addr(MASTERS[1]))]).await?;
                lab.ip(MASTERS[1], &["route", "add", "prohibit", &format!("{}/32", lab.addr(MASTERS[0]))]).await?;
            }
            "isolate-active" => {
                lab.run(&["pull-cable", target]).await?;
            }
            "wipe-data" => {
                lab.run(&["kill-daemon", master, "vsmserver", "KILL"]).await?;
                wait_dead(lab, master, "vsmserver").await;
                let dir = lab.data_dir(master);
                for e in std::fs::read_dir(&dir)? {
                    let p = e?.path();
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                }
                lab.run(&["start-daemon", master, "vsmserver"]).await?;
            }
            "role-move" => {
                let r = lab.call(master, &ApiRequest::HaNotify { state }, Duration::from_secs(5)).await?;
                if let ApiReply::Error { message, .. } = r {
                    bail!("ha notify refused: {message}");
                }
            }
            "full-disk" => fill_disk(&lab.data_dir(master))?,
            "clock-jump" => set_clock(lab, master, jump)?,
            _ => bail!("unknown fault kind {kind}"),
        }
        Ok(())
    }

    async fn heal(&mut self, a: Active) {
        let r = self.undo(a.kind, &a.target).await;
        let at = self.ms();
        self.records[a.record].healed = Some(at);
        match r {
            Ok(()) => log(self.epoch, &format!("healed {}: {} {}", a.record, a.kind, a.target)),
            Err(e) => log(
                self.epoch,
                &format!("healing {} {} {} failed: {e:#} (the final heal retries)", a.record, a.kind, a.target),
            ),
        }
    }

    async fn undo(&self, kind: &str, target: &str) -> Result<()> {
        let lab = &self.lab;
        match kind {
            "kill-server" => {
                wait_dead(lab, target, "vsmserver").await;
                lab.run(&["start-daemon", target, "vsmserver"]).await?;
            }
            "pause-server" => {
                lab.run(&["kill-daemon", target, "vsmserver", "CONT"]).await?;
            }
            "pause-agent" => {
                lab.run(&["kill-daemon", target, "vsmagent", "CONT"]).await?;
            }
            "kill-agent" => {
                wait_dead(lab, target, "vsmagent").await;
                lab.run(&["start-daemon", target, "vsmagent"]).await?;
            }
            "peer-partition" => {
                lab.ip(MASTERS[0], &["route", "del", "prohibit", &format!("{}/32", lab.addr(MASTERS[1]))]).await?;
                lab.ip(MASTERS[1], &["route", "del", "prohibit", &format!("{}/32", lab.addr(MASTERS[0]))]).await?;
            }
            "isolate-active" => {
                lab.run(&["plug-cable", target]).await?;
            }
            "role-move" => notify_true_roles(lab).await?,
            "clock-jump" => {
                let master = target.split(' ').next().unwrap_or(target);
                set_clock(lab, master, 0)?;
            }
            "full-disk" => {
                let master = target;
                let f = lab.data_dir(master).join(FILLER);
                if f.exists() {
                    std::fs::remove_file(f)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Heals whatever is still active, then makes sure of the end state whatever happened:
    /// cables in, no partition routes, every daemon running and not stopped, no filler, roles as
    /// the VIP says.
    pub async fn heal_all(&mut self) {
        while let Some(a) = self.active.pop() {
            self.heal(a).await;
        }
        let lab = self.lab.clone();
        for m in MASTERS {
            let _ = lab.run(&["plug-cable", m]).await;
            let peer = if m == MASTERS[0] { MASTERS[1] } else { MASTERS[0] };
            let _ = lab.ip(m, &["route", "del", "prohibit", &format!("{}/32", lab.addr(peer))]).await;
            let _ = std::fs::remove_file(lab.data_dir(m).join(FILLER));
            let _ = set_clock(&lab, m, 0);
        }
        for (node, name) in MASTERS.iter().map(|m| (*m, "vsmserver")).chain(AGENTS.iter().map(|a| (*a, "vsmagent"))) {
            if lab.daemon_pid(node, name).is_some() {
                let _ = lab.run(&["kill-daemon", node, name, "CONT"]).await;
            } else if let Err(e) = lab.run(&["start-daemon", node, name]).await {
                log(self.epoch, &format!("final heal: starting {name} on {node} failed: {e:#}"));
            }
        }
        // keepalived settles the VIP; then tell each daemon what the VIP says.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Err(e) = notify_true_roles(&lab).await {
            log(self.epoch, &format!("final heal: role notifications failed: {e:#}"));
        }
    }
}

/// The filler that takes a data file system's free space.
pub const FILLER: &str = "chaos-filler";

fn fill_disk(dir: &std::path::Path) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if st.blocks() as u64 * st.fragment_size() as u64 > 1 << 30 {
        bail!(
            "{} is not a small file system of its own (see VSM_LAB_DATA_TMPFS in docs/lab.md); not filling it",
            dir.display()
        );
    }
    let f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(dir.join(FILLER))?;
    let len = free as i64;
    if len > 0 {
        nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len)?;
    }
    Ok(())
}

/// Moves a master's wall clock `secs` away from true time (0: back to true time), through
/// the file libfaketime reads every second (`VSM_LAB_FAKETIME=1` in docs/lab.md).
fn set_clock(lab: &Lab, master: &str, secs: i64) -> Result<()> {
    let f = lab.node_dir(master).join("faketime");
    if !f.exists() {
        bail!("the lab does not run vsmserver under libfaketime (VSM_LAB_FAKETIME=1)");
    }
    std::fs::write(&f, format!("{secs:+}\n"))?;
    Ok(())
}

async fn wait_dead(lab: &Lab, node: &str, name: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while lab.daemon_pid(node, name).is_some() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tells each master the role the VIP gives it, as keepalived's notify hook would.
pub async fn notify_true_roles(lab: &Lab) -> Result<()> {
    let holders = lab.vip_holders().await;
    let mut failed = Vec::new();
    for m in MASTERS {
        let state = if holders.iter().any(|h| h == m) { VrrpState::Master } else { VrrpState::Backup };
        if let Err(e) = lab.call(m, &ApiRequest::HaNotify { state }, Duration::from_secs(5)).await {
            failed.push(format!("{m}: {e}"));
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}
