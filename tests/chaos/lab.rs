//! The campaign's hands on the namespace lab (`scripts/ha-lab.sh`, docs/lab.md): the masters'
//! sockets, lab commands (signals, restarts, cables, commands inside a node), who holds the
//! VIP, the desktops really running on each agent, and the daemons' logs.
//!
//! Invariant: the lab is reached only through `ha-lab.sh`, `ip` and files under the lab
//! directory, never through anything on the host's own network; every command runs under a
//! deadline.

use crate::history::Running;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vsm::client::{call, ClientError, Target};
use vsm::proto::api::{ApiReply, ApiRequest};

pub const MASTERS: [&str; 2] = ["tlha-primary", "tlha-secondary"];
pub const AGENTS: [&str; 2] = ["agent1", "agent2"];

/// Where the lab is and how to drive it.
#[derive(Clone, Debug)]
pub struct Lab {
    pub dir: PathBuf,
    pub script: PathBuf,
    pub prefix: String,
    pub net: String,
}

impl Lab {
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    pub fn socket(&self, master: &str) -> PathBuf {
        self.node_dir(master).join("run-vsm/vsmserver.sock")
    }

    /// A master's data directory as the host sees it (`/var/lib/vsm` inside the node).
    pub fn data_dir(&self, master: &str) -> PathBuf {
        self.node_dir(master).join("lib-vsm")
    }

    pub fn addr(&self, node: &str) -> String {
        let last = match node {
            "tlha-primary" => 2,
            "tlha-secondary" => 3,
            "agent1" => 11,
            "agent2" => 12,
            _ => 20,
        };
        format!("{}.{last}", self.net)
    }

    pub fn namespace(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    /// One API request to a master's Unix socket.
    pub async fn call(&self, master: &str, req: &ApiRequest, timeout: Duration) -> Result<ApiReply, ClientError> {
        call(&Target::Unix(self.socket(master)), req, timeout).await
    }

    /// Runs `ha-lab.sh ARGS...`; returns its stdout, or an error with its stderr.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.script).args(args).kill_on_drop(true);
        cmd.env("VSM_LAB_DIR", &self.dir).env("VSM_LAB_PREFIX", &self.prefix).env("VSM_LAB_NET", &self.net);
        cmd.stdin(std::process::Stdio::null());
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .map_err(|_| anyhow!("ha-lab.sh {} did not finish within 90 s", args.join(" ")))?
            .with_context(|| format!("running ha-lab.sh {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "ha-lab.sh {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command inside a node's network namespace only (`ip -n`-style, cheap).
    pub async fn ip(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.arg("-n").arg(self.namespace(node)).args(args).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
            .await
            .map_err(|_| anyhow!("ip {} did not finish", args.join(" ")))??;
        if !out.status.success() {
            bail!(
                "ip -n {} {} failed: {}",
                self.namespace(node),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The masters that hold the VIP on their `eth0`.
    pub async fn vip_holders(&self) -> Vec<String> {
        let vip = format!(" {}.4/", self.net);
        let mut out = Vec::new();
        for m in MASTERS {
            if let Ok(s) = self.ip(m, &["-4", "-o", "addr", "show", "dev", "eth0"]).await {
                if s.contains(&vip) {
                    out.push(m.to_string());
                }
            }
        }
        out
    }

    /// The pid of a tracked daemon, if it is alive.
    pub fn daemon_pid(&self, node: &str, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("pids").join(format!("{node}.{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(") ")?.1.chars().next()?;
        (state != 'Z').then_some(pid)
    }

    /// Desktops really running on the agents: processes inside an agent's namespace that carry
    /// `VSM_SESSION_ID` (the session command and its PAM helper), grouped by session.
    pub fn running_desktops(&self) -> Result<Vec<Running>> {
        let mut ns_of: BTreeMap<u64, &str> = BTreeMap::new();
        for a in AGENTS {
            let p = Path::new("/run/netns").join(self.namespace(a));
            let ino = std::fs::metadata(&p).with_context(|| format!("namespace {}", p.display()))?.ino();
            ns_of.insert(ino, a);
        }
        let mut found: BTreeMap<String, Running> = BTreeMap::new();
        for e in std::fs::read_dir("/proc")? {
            let Ok(e) = e else { continue };
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(link) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else { continue };
            let link = link.to_string_lossy().into_owned();
            let Some(ino) = link.strip_prefix("net:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok())
            else {
                continue;
            };
            let Some(agent) = ns_of.get(&ino) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            if stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) == Some('Z') {
                continue;
            }
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
            let mut id = None;
            let mut user = String::new();
            for kv in env.split(|b| *b == 0) {
                let kv = String::from_utf8_lossy(kv);
                if let Some(v) = kv.strip_prefix("VSM_SESSION_ID=") {
                    id = Some(v.to_string());
                } else if let Some(v) = kv.strip_prefix("USER=") {
                    user = v.to_string();
                }
            }
            let Some(id) = id else { continue };
            let r = found.entry(id.clone()).or_insert_with(|| Running {
                session: id,
                agent: agent.to_string(),
                user: user.clone(),
                pids: Vec::new(),
            });
            r.pids.push(pid);
        }
        Ok(found.into_values().collect())
    }

    /// Lines of the daemons' logs that contain `needle`, as `node/daemon.log: line`, at most
    /// `max`.
    pub fn log_lines(&self, needle: &str, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        for node in MASTERS.iter().chain(AGENTS.iter()) {
            for name in ["vsmserver", "vsmagent"] {
                let p = self.node_dir(node).join("log").join(format!("{name}.log"));
                let Ok(text) = std::fs::read(&p) else { continue };
                for l in String::from_utf8_lossy(&text).lines().filter(|l| l.contains(needle)) {
                    if out.len() >= max {
                        return out;
                    }
                    out.push(format!("{node}/{name}.log: {l}"));
                }
            }
        }
        out
    }

    /// Lines with a panic in the daemons' logs.
    pub fn panics(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for node in MASTERS.iter().chain(AGENTS.iter()) {
            for name in ["vsmserver", "vsmagent", "hawatch"] {
                let p = self.node_dir(node).join("log").join(format!("{name}.log"));
                let Ok(text) = std::fs::read(&p) else { continue };
                let lines: Vec<String> = String::from_utf8_lossy(&text)
                    .lines()
                    .filter(|l| l.contains("panicked at"))
                    .map(str::to_string)
                    .collect();
                if !lines.is_empty() {
                    out.insert(format!("{node}/{name}.log"), lines);
                }
            }
        }
        out
    }
}
