//! [`Metrics`]: every Prometheus metric family of the master, in one table, and their
//! exposition (Prometheus text 0.0.4 or OpenMetrics text) with process figures from `/proc`.
//!
//! Components get a clone of the one [`Metrics`] value from the server wiring and update the
//! families where the event happens (a login, an agent call, a resync); state figures
//! (sessions by state, replication positions, agent reachability) are gauges the HTTP
//! endpoint sets from the components' status just before it encodes a scrape.
//!
//! Adding a metric is one line in the `metrics!` table below: the field name is the metric
//! name after `vsm_`; the crate adds the unit suffix (`_seconds`, `_bytes`) and `_total` for
//! counters, and escapes label values.
//!
//! Invariants: depends on nothing else in the crate and does no I/O except reading
//! `/proc/self` while encoding; no value is ever NaN or infinite (gauges that have no value
//! yet are absent or 0, never NaN); label values are bounded sets (outcomes, reasons, call
//! kinds) except agent names, which come from the configuration and the session database.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A counter per label set.
pub type Counters<L> = Family<L, Counter>;
/// A gauge per label set.
pub type Gauges<L> = Family<L, Gauge>;
/// A histogram per label set, all with the same buckets.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
/// A gauge holding a fraction (seconds, ratios).
pub type FloatGauge = Gauge<f64, AtomicU64>;
/// A fractional gauge per label set.
pub type FloatGauges<L> = Family<L, FloatGauge>;

/// One label: `name="value"` with a fixed name and a value from a small set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallErrorLabels {
    pub call: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    pub agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResyncLabels {
    /// `incremental` or `snapshot`.
    pub kind: &'static str,
    /// `received` (this node caught up) or `sent` (the peer caught up).
    pub direction: &'static str,
}

/// Upper bounds for agent calls: a loopback call takes well under a millisecond, a call
/// that times out takes `/vsmserver/agent_timeout`.
fn call_buckets() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

/// Upper bounds for resyncs: from an incremental catch-up of a few changes to a snapshot of
/// a large database over a slow link.
fn resync_buckets() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
}

/// Declares the families: `field: Type = initial value, unit, "help";` one line each.
macro_rules! metrics {
    ($( $field:ident : $ty:ty = $init:expr, $unit:expr, $help:literal; )*) => {
        /// Every metric family of the master; reached through [`Metrics`] (which derefs to it).
        #[derive(Debug)]
        pub struct Families {
            $( #[doc = $help] pub $field: $ty, )*
        }

        impl Families {
            fn new(registry: &mut Registry) -> Families {
                let f = Families { $( $field: $init, )* };
                $( register(registry, concat!("vsm_", stringify!($field)), $help, $unit, f.$field.clone()); )*
                f
            }
        }
    };
}

metrics! {
    // Events, counted where they happen.
    logins: Counters<OutcomeLabel> = Default::default(), None, "Logins answered with a session, by outcome (created, reconnected).";
    login_failures: Counters<ReasonLabel> = Default::default(), None, "Logins that got no session, by reason (not_allowed, limit_reached, no_agent_available, start_failed, bad_request, not_ready, internal).";
    session_creates: Counter = Default::default(), None, "Sessions an agent started and the master committed.";
    agent_calls: Counters<CallLabel> = Default::default(), None, "Calls to agents, by call (start, verify, terminate, list, load).";
    agent_call_errors: Counters<CallErrorLabels> = Default::default(), None, "Failed calls to agents, by call and kind (unreachable, no_answer, refused, protocol, agent_error).";
    agent_call_duration: Histograms<CallLabel> = Family::new_with_constructor(call_buckets), Some(Unit::Seconds), "Time agent calls took, failures included, by call.";
    ha_resyncs: Counters<ResyncLabels> = Default::default(), None, "Completed resyncs with the peer, by kind and direction.";
    ha_resync_duration: Histograms<ResyncLabels> = Family::new_with_constructor(resync_buckets), Some(Unit::Seconds), "Time from link up to caught up, by kind and direction.";
    requests_refused_not_ready: Counter = Default::default(), None, "Logins, terminations and admin writes refused because the node was not ready.";
    // State, set from the components' status at each scrape.
    sessions: Gauges<StateLabel> = Default::default(), None, "Live sessions in the session database, by state.";
    ready: Gauge = Default::default(), None, "1 when the node is ready to serve (tlctl ha check).";
    readiness: Gauges<StateLabel> = Default::default(), None, "1 for the node's readiness state (as tlctl ha status shows it), 0 for every other state.";
    role_active: Gauge = Default::default(), None, "1 when this node serves clients (active role).";
    ha_configured: Gauge = Default::default(), None, "1 when /HA/enabled is true.";
    ha_enabled: Gauge = Default::default(), None, "1 when HA replication runs.";
    ha_configured_but_off: Gauge = Default::default(), None, "1 when /HA/enabled is true but the node runs without HA (see tlctl ha status for why).";
    ha_link_up: Gauge = Default::default(), None, "1 when the peer link is streaming.";
    ha_degraded: Gauge = Default::default(), None, "1 when writes were answered without the peer's acknowledgement.";
    ha_config_mismatch: Gauge = Default::default(), None, "1 when the peer's subcluster and agent configuration differs from this node's.";
    ha_local_head: Gauge = Default::default(), None, "Last position of this node's change log.";
    ha_peer_acked: Gauge = Default::default(), None, "Position of this node's change log the peer has stored.";
    ha_peer_head: Gauge = Default::default(), None, "Last position of the peer's change log, as last heard.";
    ha_applied_of_peer: Gauge = Default::default(), None, "Position of the peer's change log this node has applied.";
    ha_lag_changes: Gauge = Default::default(), None, "Local changes the peer has not acknowledged.";
    ha_lag: FloatGauge = Default::default(), Some(Unit::Seconds), "Age of the oldest local change the peer has not acknowledged.";
    ha_clock_offset: FloatGauges<PeerLabel> = Default::default(), Some(Unit::Seconds), "The peer's clock minus this node's, as last measured from its heartbeats (absent until measured).";
    ha_clock_offset_exceeded: Gauge = Default::default(), None, "1 when the clock offset to the peer is beyond /HA/max_clock_offset.";
    ha_max_clock_offset: FloatGauge = Default::default(), Some(Unit::Seconds), "/HA/max_clock_offset.";
    agents: Gauge = Default::default(), None, "Agents known to this master (configured or hosting sessions).";
    agents_reachable: Gauge = Default::default(), None, "Known agents that answered their last call.";
    agent_reachable: Gauges<AgentLabel> = Default::default(), None, "1 when the agent answered its last call.";
    agent_sessions: Gauges<AgentLabel> = Default::default(), None, "Live sessions per agent.";
    agent_clock_offset: FloatGauges<AgentLabel> = Default::default(), Some(Unit::Seconds), "Each agent's clock minus this master's, from its last load report.";
}

fn register<M: prometheus_client::registry::Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) {
    // The crate appends the full stop itself.
    let help = help.trim_end_matches('.');
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric),
        None => registry.register(name, help, metric),
    }
}

/// The metrics of one master; cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    families: Families,
    registry: Registry,
    /// Scrapes set the state gauges, then encode: one at a time, so two scrapes never
    /// interleave clearing and setting per-agent gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Deref for Metrics {
    type Target = Families;
    fn deref(&self) -> &Families {
        &self.inner.families
    }
}

/// Which text format a scrape asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text, when the scraper's `Accept` header asks for it.
    OpenMetrics,
}

impl Format {
    /// Picks the format from an HTTP `Accept` header value.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    /// Every family at zero, plus build information and process figures.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let families = Families::new(&mut registry);
        registry.register("vsm_build", "Version of this build", Info::new([("version", env!("CARGO_PKG_VERSION"))]));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { inner: Arc::new(Inner { families, registry, scrape: tokio::sync::Mutex::new(()) }) }
    }

    /// Held by a scrape while it sets the state gauges and encodes.
    pub async fn scrape_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.scrape.lock().await
    }

    /// The exposition of every family as it stands.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = match format {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry),
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &self.inner.registry),
        };
        out
    }

    /// Counts one call to an agent: its duration and, if it failed, the kind of failure.
    pub fn agent_call(&self, call: &'static str, seconds: f64, error: Option<&'static str>) {
        self.agent_calls.get_or_create(&CallLabel { call }).inc();
        self.agent_call_duration.get_or_create(&CallLabel { call }).observe(seconds);
        if let Some(kind) = error {
            self.agent_call_errors.get_or_create(&CallErrorLabels { call, kind }).inc();
        }
    }

    /// Counts one completed resync.
    pub fn resync(&self, kind: &'static str, direction: &'static str, seconds: f64) {
        let l = ResyncLabels { kind, direction };
        self.ha_resyncs.get_or_create(&l).inc();
        self.ha_resync_duration.get_or_create(&l).observe(seconds);
    }
}

/// 0 or 1.
pub fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// Process figures read from `/proc/self` at each scrape, under the names every Prometheus
/// client library uses (`process_*`). A figure that cannot be read is left out.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessFigures::read();
        if let Some(v) = p.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, v: Option<f64>| {
            let Some(v) = v.filter(|v| v.is_finite()) else { return Ok(()) };
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
        };
        gauge("process_resident_memory", "Resident memory size", Some(&Unit::Bytes), p.resident_bytes)?;
        gauge("process_virtual_memory", "Virtual memory size", Some(&Unit::Bytes), p.virtual_bytes)?;
        gauge("process_open_fds", "Open file descriptors", None, p.open_fds)?;
        gauge("process_max_fds", "Limit of open file descriptors", None, p.max_fds)?;
        gauge(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(&Unit::Seconds),
            p.start_time,
        )?;
        Ok(())
    }
}

/// What `/proc/self` says about this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    /// Seconds since the Unix epoch.
    pub start_time: Option<f64>,
}

impl ProcessFigures {
    pub fn read() -> ProcessFigures {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s));
        let mut p = parse_stat(&stat, ticks as f64, page as f64, boot);
        p.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        p.max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| max_open_files(&s));
        p
    }
}

/// Figures from `/proc/self/stat` (fields after the parenthesised command name, which may
/// itself hold spaces and parentheses).
fn parse_stat(stat: &str, ticks_per_s: f64, page_bytes: f64, boot_time: Option<f64>) -> ProcessFigures {
    let mut p = ProcessFigures::default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return p };
    // `rest` starts at field 3 (state); utime is field 14, so index 11 here.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
    if ticks_per_s > 0.0 {
        if let (Some(u), Some(s)) = (num(11), num(12)) {
            p.cpu_seconds = Some((u + s) / ticks_per_s);
        }
        if let (Some(start), Some(boot)) = (num(19), boot_time) {
            p.start_time = Some(boot + start / ticks_per_s);
        }
    }
    p.virtual_bytes = num(20);
    if page_bytes > 0.0 {
        p.resident_bytes = num(21).map(|pages| pages * page_bytes);
    }
    p
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis must not shift the fields.
        let stat = "1234 (vsm (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 500 \
                    10485760 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(stat, 100.0, 4096.0, Some(1_700_000_000.0));
        assert_eq!(p.cpu_seconds, Some(3.0));
        assert_eq!(p.start_time, Some(1_700_000_005.0));
        assert_eq!(p.virtual_bytes, Some(10485760.0));
        assert_eq!(p.resident_bytes, Some(300.0 * 4096.0));
        assert_eq!(parse_stat("garbage", 100.0, 4096.0, None), ProcessFigures::default());
    }

    #[test]
    fn limits_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        assert_eq!(boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"), Some(1_700_000_000.0));
    }

    #[test]
    fn this_process_has_figures() {
        let p = ProcessFigures::read();
        assert!(p.resident_bytes.unwrap() > 0.0);
        assert!(p.open_fds.unwrap() >= 1.0);
        assert!(p.start_time.unwrap() > 1e9);
        assert!(p.cpu_seconds.is_some());
    }

    #[test]
    fn exposition_has_conventional_names_types_and_no_nan() {
        let m = Metrics::new();
        m.logins.get_or_create(&OutcomeLabel { outcome: "created" }).inc();
        m.agent_call("start", 0.002, Some("unreachable"));
        m.resync("snapshot", "received", 1.5);
        m.agent_sessions.get_or_create(&AgentLabel { agent: "odd \"name\"\\ \n".into() }).set(2);
        m.ha_lag.set(0.25);
        let text = m.encode(Format::Prometheus);
        for want in [
            "# TYPE vsm_logins_total counter\n",
            "vsm_logins_total{outcome=\"created\"} 1\n",
            "# TYPE vsm_agent_call_duration_seconds histogram\n",
            "vsm_agent_call_duration_seconds_bucket{call=\"start\",le=\"0.0025\"} 1\n",
            "vsm_agent_call_duration_seconds_count{call=\"start\"} 1\n",
            "vsm_agent_call_errors_total{call=\"start\",kind=\"unreachable\"} 1\n",
            "vsm_ha_resync_duration_seconds_sum{kind=\"snapshot\",direction=\"received\"} 1.5\n",
            "vsm_ha_lag_seconds 0.25\n",
            "# TYPE vsm_session_creates_total counter\n",
            "vsm_build_info{version=\"",
            "# TYPE process_cpu_seconds_total counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "# TYPE process_open_fds gauge\n",
            "# TYPE process_start_time_seconds gauge\n",
            // Quotes, backslashes and newlines in label values are escaped.
            "vsm_agent_sessions{agent=\"odd \\\"name\\\"\\\\ \\n\"} 2\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.to_lowercase().contains("nan"), "{text}");
        let om = m.encode(Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE vsm_logins counter\n"), "{om}");
    }

    #[test]
    fn format_from_accept() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        let prom = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
    }
}
