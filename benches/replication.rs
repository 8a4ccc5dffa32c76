//! Replicated-write comparison: the same small session row, committed on node A and applied
//! on node B before the writer is answered, written to vsm, PostgreSQL (synchronous standby,
//! `remote_apply`) or Redis (`SET` + `WAIT 1 0`), from the same driver.
//!
//! This binary owns only the client side: it never starts or configures a server (that is
//! `scripts/bench-replication.sh`), and it refuses to measure a server that is not set up for
//! synchronous replication, so a figure it prints is always a replicated one.
//!
//! Invariants:
//! - Every writer has exactly one connection and one request in flight on it.
//! - Only writes that start after the warm-up and before the end of the window are counted;
//!   every counted write has its own latency sample (no sampling, no histogram buckets).
//! - Any failed write ends the run with a non-zero exit status: a partial figure is not printed.
//!
//! Usage: `cargo bench --bench replication -- --target pg|redis|vsm --addr ADDR
//! --writers N --duration SECS --warmup SECS`.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vsm::metrics::ProcessFigures;
use vsm::model::{Session, SessionId, SessionStatus};

#[path = "replication/echo.rs"]
mod echo;
#[path = "replication/pg.rs"]
mod pg;
#[path = "replication/redis.rs"]
mod redis;
#[path = "replication/vsm.rs"]
mod vsm_backend;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    Pg,
    Redis,
    Vsm,
    /// No replication: a 64-byte loopback TCP round trip, the floor under every other figure.
    Echo,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Pg => "pg",
            TargetKind::Redis => "redis",
            TargetKind::Vsm => "vsm",
            TargetKind::Echo => "echo",
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "replication", about = "Replicated small-row writes: vsm vs PostgreSQL vs Redis")]
struct Args {
    /// System under test.
    #[arg(long, value_enum)]
    target: TargetKind,
    /// pg: `HOST:PORT` (user postgres, database postgres) or a full conninfo string;
    /// redis: `HOST:PORT`; vsm: the master's Unix socket path; echo: ignored.
    #[arg(long, default_value = "")]
    addr: String,
    /// Concurrent writers, each with its own connection and one write in flight.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of writing before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Session ids each writer rotates over (0: a fresh id for every write).
    #[arg(long, default_value_t = 1000)]
    ids: usize,
    /// Free-form label copied into the JSON line (e.g. `sync=full`).
    #[arg(long, default_value = "")]
    label: String,
    /// vsm only: `conn` keeps one connection per writer, `call` uses `vsm::client::call`
    /// (a new connection per write).
    #[arg(long, default_value = "conn")]
    vsm_mode: String,
    /// vsm only: also measure a master with `/HA/sync=async` (answered before the peer has the
    /// write: not a replicated write, only for finding where the time goes).
    #[arg(long)]
    vsm_allow_async: bool,
    /// Per-write timeout in seconds (vsm; pg and redis block, as their clients do).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One writer's connection to the system under test.
pub trait Writer: Send {
    /// Writes `session` and returns once the system says it is applied on the replica.
    fn write(&mut self, session: &Session) -> Result<()>;
}

/// Builds one connection per writer and describes the server's replication set-up.
pub trait Backend: Sync {
    /// Checks that the server replicates synchronously; returns a description for the report.
    fn check(&self) -> Result<String>;
    fn connect(&self) -> Result<Box<dyn Writer>>;
}

/// The row every backend writes: a session record of about 200 bytes of payload.
/// `slot` is which of the writer's ids this is, `n` the write's number: a rewrite of an id
/// changes what a session update changes (times, the process id) and keeps what a session
/// keeps for its life (its user, agent and display), as a session's status update would.
fn make_session(id: SessionId, writer: usize, slot: u64, n: u64) -> Session {
    let now = vsm::model::now_ms();
    Session {
        id,
        user: format!("user{:04}", writer),
        subcluster: "default".into(),
        agent: format!("agent{}.example.org", writer % 4 + 1),
        agent_address: format!("10.0.0.{}", writer % 4 + 11),
        display: 10 + (slot % 90) as u32,
        vnc_port: 5910 + (slot % 90) as u16,
        status: SessionStatus::Running,
        created_ms: now,
        last_connect_ms: now,
        last_client_address: "192.0.2.17".into(),
        pid: 4000 + (n % 30000) as u32,
        command: Vec::new(),
        geometry: "1920x1080".into(),
        client_params: Vec::new(),
    }
}

struct Outcome {
    samples_ns: Vec<u64>,
    error: Option<anyhow::Error>,
}

fn run_writer(
    mut w: Box<dyn Writer>,
    writer: usize,
    ids: usize,
    start: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    warm_end: Arc<std::sync::OnceLock<(Instant, Instant)>>,
) -> Outcome {
    let pool: Vec<SessionId> = (0..ids).map(|_| SessionId::generate()).collect();
    let mut samples = Vec::with_capacity(1 << 16);
    start.wait();
    let Some(&(measure_from, end)) = warm_end.get() else {
        return Outcome { samples_ns: samples, error: Some(anyhow::anyhow!("start time was not set")) };
    };
    let mut n: u64 = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (id, slot) =
            if ids == 0 { (SessionId::generate(), n) } else { (pool[(n as usize) % ids].clone(), n % ids as u64) };
        let s = make_session(id, writer, slot, n);
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if let Err(e) = w.write(&s) {
            stop.store(true, Ordering::Relaxed);
            return Outcome { samples_ns: samples, error: Some(e.context(format!("writer {writer}, write {n}"))) };
        }
        let t1 = Instant::now();
        if t0 >= measure_from {
            samples.push((t1 - t0).as_nanos() as u64);
        }
        n += 1;
    }
    Outcome { samples_ns: samples, error: None }
}

/// The 1-minute load average (the machine is shared: every figure carries it).
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// CPU time (user and system, every core) the machine has spent since boot, in seconds,
/// from `/proc/stat`.
fn machine_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice: user, nice, system,
    // irq, softirq and steal (guest time is counted in user already).
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| fields.get(i)).sum();
    Some(busy as f64 / clock_ticks())
}

/// Clock ticks per second (the unit of `/proc/stat`).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn backend(args: &Args) -> Result<Box<dyn Backend>> {
    Ok(match args.target {
        TargetKind::Pg => Box::new(pg::Pg::new(&args.addr)),
        TargetKind::Redis => Box::new(redis::Redis::new(&args.addr)),
        TargetKind::Echo => Box::new(echo::Echo::start()?),
        TargetKind::Vsm => Box::new(vsm_backend::Vsm::new(
            &args.addr,
            &args.vsm_mode,
            Duration::from_secs_f64(args.timeout),
            args.vsm_allow_async,
        )?),
    })
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replication bench: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.writers == 0 || args.writers > 1024 {
        bail!("--writers must be between 1 and 1024, got {}", args.writers);
    }
    if !args.duration.is_finite() || args.duration <= 0.0 || !args.warmup.is_finite() || args.warmup < 0.0 {
        bail!("--duration must be > 0 and --warmup >= 0 seconds");
    }
    let b = backend(&args)?;
    let setup = b.check().context("checking the server's replication set-up")?;
    let mut conns = Vec::with_capacity(args.writers);
    for i in 0..args.writers {
        conns.push(b.connect().with_context(|| format!("connecting writer {i} to {}", args.addr))?);
    }
    let row_bytes = serde_json::to_vec(&make_session(SessionId::generate(), 0, 0, 0)).map(|v| v.len()).unwrap_or(0);

    let start = Arc::new(Barrier::new(args.writers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let times = Arc::new(std::sync::OnceLock::new());
    let mut handles = Vec::with_capacity(args.writers);
    for (i, w) in conns.into_iter().enumerate() {
        let (start, stop, times) = (start.clone(), stop.clone(), times.clone());
        let ids = args.ids;
        handles.push(
            std::thread::Builder::new()
                .name(format!("writer-{i}"))
                .spawn(move || run_writer(w, i, ids, start, stop, times))
                .context("spawning a writer thread")?,
        );
    }
    let load_start = loadavg();
    let t_start = Instant::now();
    let measure_from = t_start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let _ = times.set((measure_from, end));
    start.wait();
    // CPU time over the measured window: the whole machine's and this driver's own, so
    // what the servers spend per write can be compared between systems.
    std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
    let cpu_start = (machine_cpu_s(), ProcessFigures::read().cpu_seconds);
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let cpu_end = (machine_cpu_s(), ProcessFigures::read().cpu_seconds);

    let mut samples = Vec::new();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(o) => {
                samples.extend_from_slice(&o.samples_ns);
                if first_error.is_none() {
                    first_error = o.error;
                }
            }
            Err(_) => bail!("a writer thread panicked"),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let load_end = loadavg();
    samples.sort_unstable();
    let n = samples.len();
    let secs = args.duration;
    let rate = n as f64 / secs;
    let (p50, p99, p999) =
        (percentile_us(&samples, 0.50), percentile_us(&samples, 0.99), percentile_us(&samples, 0.999));
    let max = samples.last().map(|&v| v as f64 / 1000.0).unwrap_or(0.0);
    let mean = if n == 0 { 0.0 } else { samples.iter().sum::<u64>() as f64 / n as f64 / 1000.0 };
    let per_write_us = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if n > 0 => Some(((b - a) * 1e6 / n as f64).round()),
        _ => None,
    };
    let machine_cpu_us = per_write_us(cpu_start.0, cpu_end.0);
    let driver_cpu_us = per_write_us(cpu_start.1, cpu_end.1);
    let json = serde_json::json!({
        "target": args.target.name(),
        "label": args.label,
        "writers": args.writers,
        "duration_s": secs,
        "warmup_s": args.warmup,
        "n": n,
        "writes_per_s": (rate * 10.0).round() / 10.0,
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "max_us": max,
        "mean_us": (mean * 1000.0).round() / 1000.0,
        "row_json_bytes": row_bytes,
        "ids_per_writer": args.ids,
        "setup": setup,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "machine_cpu_us_per_write": machine_cpu_us,
        "driver_cpu_us_per_write": driver_cpu_us,
    });
    // Written, not printed: a reader that closed the pipe early (`| head -n 1`) ends the
    // output quietly instead of making `println!` panic.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let _ = writeln!(
        out,
        "{:<5} writers={:<3} {:>9.0} writes/s  p50 {:>8.1} us  p99 {:>8.1} us  p999 {:>8.1} us  n={} cpu/write {} us (driver {}) load {:.2}->{:.2} [{}]",
        args.target.name(),
        args.writers,
        rate,
        p50,
        p99,
        p999,
        n,
        machine_cpu_us.map_or("?".to_string(), |v| v.to_string()),
        driver_cpu_us.map_or("?".to_string(), |v| v.to_string()),
        load_start.unwrap_or(f64::NAN),
        load_end.unwrap_or(f64::NAN),
        setup
    );
    Ok(())
}
