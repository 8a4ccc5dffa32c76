//! PostgreSQL backend: one autocommit `INSERT ... ON CONFLICT (id) DO UPDATE` per write, through a
//! prepared statement; with `synchronous_commit=remote_apply` and a synchronous standby, the commit
//! returns only after the standby has applied it.
//!
//! Never creates anything but the `sessions` table; refuses a server without a synchronous standby.

use super::{Backend, Writer};
use anyhow::{bail, Context, Result};
use postgres::{Client, NoTls, Statement};
use vsm::model::Session;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS sessions (
    id text PRIMARY KEY,
    username text NOT NULL,
    subcluster text NOT NULL,
    agent text NOT NULL,
    agent_address text NOT NULL,
    display integer NOT NULL,
    vnc_port integer NOT NULL,
    status text NOT NULL,
    created_ms bigint NOT NULL,
    last_connect_ms bigint NOT NULL,
    last_client_address text NOT NULL,
    pid integer NOT NULL,
    geometry text NOT NULL)";

const UPSERT: &str = "INSERT INTO sessions (id, username, subcluster, agent, agent_address, display, \
vnc_port, status, created_ms, last_connect_ms, last_client_address, pid, geometry) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username, subcluster = EXCLUDED.subcluster, \
agent = EXCLUDED.agent, agent_address = EXCLUDED.agent_address, display = EXCLUDED.display, \
vnc_port = EXCLUDED.vnc_port, status = EXCLUDED.status, created_ms = EXCLUDED.created_ms, \
last_connect_ms = EXCLUDED.last_connect_ms, last_client_address = EXCLUDED.last_client_address, \
pid = EXCLUDED.pid, geometry = EXCLUDED.geometry";

pub struct Pg {
    conninfo: String,
}

impl Pg {
    /// `HOST:PORT` (user and database `postgres`) or a libpq-style conninfo string.
    pub fn new(addr: &str) -> Pg {
        let conninfo = if addr.contains('=') {
            addr.to_string()
        } else {
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "5432"));
            format!("host={host} port={port} user=postgres dbname=postgres")
        };
        Pg { conninfo }
    }

    fn client(&self) -> Result<Client> {
        Client::connect(&self.conninfo, NoTls).with_context(|| format!("connecting to postgres ({})", self.conninfo))
    }
}

impl Backend for Pg {
    fn check(&self) -> Result<String> {
        let mut c = self.client()?;
        let show = |c: &mut Client, what: &str| -> Result<String> {
            let row = c.query_one(&format!("SHOW {what}"), &[])?;
            Ok(row.try_get::<_, String>(0)?)
        };
        let commit = show(&mut c, "synchronous_commit")?;
        let names = show(&mut c, "synchronous_standby_names")?;
        let version = show(&mut c, "server_version")?;
        let sync: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'",
                &[],
            )?
            .try_get(0)?;
        if commit != "remote_apply" {
            bail!("synchronous_commit is {commit:?}, expected \"remote_apply\"");
        }
        if sync < 1 {
            bail!("no synchronous standby is streaming (synchronous_standby_names = {names:?})");
        }
        c.batch_execute(CREATE).context("creating the sessions table")?;
        Ok(format!("postgres {version}, synchronous_commit={commit}, {sync} sync standby ({names})"))
    }

    fn connect(&self) -> Result<Box<dyn Writer>> {
        let mut client = self.client()?;
        let stmt = client.prepare(UPSERT).context("preparing the upsert")?;
        Ok(Box::new(PgWriter { client, stmt }))
    }
}

struct PgWriter {
    client: Client,
    stmt: Statement,
}

impl Writer for PgWriter {
    fn write(&mut self, s: &Session) -> Result<()> {
        let n = self.client.execute(
            &self.stmt,
            &[
                &s.id.0,
                &s.user,
                &s.subcluster,
                &s.agent,
                &s.agent_address,
                &(s.display as i32),
                &(s.vnc_port as i32),
                &s.status.as_str(),
                &(s.created_ms as i64),
                &(s.last_connect_ms as i64),
                &s.last_client_address,
                &(s.pid as i32),
                &s.geometry,
            ],
        )?;
        if n != 1 {
            bail!("upsert touched {n} rows, expected 1");
        }
        Ok(())
    }
}
