//! Redis backend: `SET session:<id> <json>` and `WAIT 1 0` sent together (one round trip);
//! the write counts only when `SET` answered `OK` and `WAIT` reports one replica.
//!
//! Speaks the few RESP replies it needs over a std `TcpStream` with `TCP_NODELAY`; every reply
//! it does not expect is an error, never a panic.

use super::{Backend, Writer};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use vsm::model::Session;

pub struct Redis {
    addr: String,
}

impl Redis {
    pub fn new(addr: &str) -> Redis {
        Redis { addr: addr.to_string() }
    }

    fn conn(&self) -> Result<Conn> {
        let s = TcpStream::connect(&self.addr).with_context(|| format!("connecting to redis at {}", self.addr))?;
        s.set_nodelay(true)?;
        let r = BufReader::with_capacity(1 << 16, s.try_clone()?);
        Ok(Conn { w: s, r, buf: Vec::with_capacity(1024) })
    }
}

#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
}

fn push_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

impl Conn {
    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            bail!("redis closed the connection");
        }
        if !l.ends_with("\r\n") {
            bail!("redis sent a line without CRLF: {l:?}");
        }
        l.truncate(l.len() - 2);
        Ok(l)
    }

    fn reply(&mut self) -> Result<Reply> {
        let l = self.line()?;
        let (t, rest) = l.split_at(l.chars().next().map(char::len_utf8).unwrap_or(0));
        let num = |s: &str| s.parse::<i64>().map_err(|_| anyhow!("redis sent a bad number {s:?}"));
        Ok(match t {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(num(rest)?),
            "$" => {
                let n = num(rest)?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut v = vec![0u8; n as usize + 2];
                    std::io::Read::read_exact(&mut self.r, &mut v)?;
                    v.truncate(n as usize);
                    Reply::Bulk(Some(v))
                }
            }
            "*" => {
                let n = num(rest)?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.reply()?);
                }
                Reply::Array(v)
            }
            _ => bail!("redis sent an unknown reply type: {l:?}"),
        })
    }

    fn send(&mut self) -> Result<()> {
        self.w.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    fn command(&mut self, args: &[&[u8]]) -> Result<Reply> {
        push_command(&mut self.buf, args);
        self.send()?;
        self.reply()
    }
}

impl Backend for Redis {
    fn check(&self) -> Result<String> {
        let mut c = self.conn()?;
        let info = match c.command(&[b"INFO", b"replication"])? {
            Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
            other => bail!("INFO replication answered {other:?}"),
        };
        let field = |k: &str| {
            info.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':'))).unwrap_or("?").to_string()
        };
        if field("role") != "master" {
            bail!("redis at {} has role {}, expected master", self.addr, field("role"));
        }
        let replicas: u32 = field("connected_slaves").parse().unwrap_or(0);
        if replicas < 1 {
            bail!("redis at {} has no connected replica", self.addr);
        }
        let version = match c.command(&[b"INFO", b"server"])? {
            Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v)
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:").map(str::to_string))
                .unwrap_or_else(|| "?".into()),
            _ => "?".into(),
        };
        let persist = |c: &mut Conn, k: &[u8]| -> String {
            match c.command(&[b"CONFIG", b"GET", k]) {
                Ok(Reply::Array(v)) => match v.get(1) {
                    Some(Reply::Bulk(Some(b))) => String::from_utf8_lossy(b).into_owned(),
                    _ => "?".into(),
                },
                _ => "?".into(),
            }
        };
        let aof = persist(&mut c, b"appendonly");
        let save = persist(&mut c, b"save");
        Ok(format!("redis {version}, {replicas} replica, SET+WAIT 1 0 pipelined, appendonly={aof}, save={save:?}"))
    }

    fn connect(&self) -> Result<Box<dyn Writer>> {
        let mut c = self.conn()?;
        match c.command(&[b"PING"])? {
            Reply::Simple(s) if s == "PONG" => {}
            other => bail!("PING answered {other:?}"),
        }
        Ok(Box::new(RedisWriter { c, key: Vec::with_capacity(64) }))
    }
}

struct RedisWriter {
    c: Conn,
    key: Vec<u8>,
}

impl Writer for RedisWriter {
    fn write(&mut self, s: &Session) -> Result<()> {
        let value = serde_json::to_vec(s)?;
        self.key.clear();
        self.key.extend_from_slice(b"session:");
        self.key.extend_from_slice(s.id.0.as_bytes());
        push_command(&mut self.c.buf, &[b"SET", &self.key, &value]);
        push_command(&mut self.c.buf, &[b"WAIT", b"1", b"0"]);
        self.c.send()?;
        match self.c.reply()? {
            Reply::Simple(ok) if ok == "OK" => {}
            Reply::Error(e) => bail!("SET failed: {e}"),
            other => bail!("SET answered {other:?}"),
        }
        match self.c.reply()? {
            Reply::Int(1) => Ok(()),
            Reply::Error(e) => bail!("WAIT failed: {e}"),
            other => bail!("WAIT 1 0 answered {other:?}, expected 1 replica"),
        }
    }
}
