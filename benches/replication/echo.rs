//! Loopback floor: a 64-byte TCP ping-pong with an echo server inside this process, through the
//! same driver. It replicates nothing; it shows what one round trip costs on the machine at the
//! moment of the run, so that the other figures can be read against it.

use super::{Backend, Writer};
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use vsm::model::Session;

const MSG: usize = 64;

pub struct Echo {
    addr: SocketAddr,
}

impl Echo {
    /// Starts the echo server on an ephemeral loopback port; its threads end with the process.
    pub fn start() -> Result<Echo> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding the echo listener")?;
        let addr = l.local_addr()?;
        std::thread::Builder::new().name("echo-accept".into()).spawn(move || {
            for s in l.incoming().flatten() {
                let _ = std::thread::Builder::new().name("echo".into()).spawn(move || serve(s));
            }
        })?;
        Ok(Echo { addr })
    }
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut b = [0u8; MSG];
    while s.read_exact(&mut b).is_ok() {
        if s.write_all(&b).is_err() {
            return;
        }
    }
}

impl Backend for Echo {
    fn check(&self) -> Result<String> {
        Ok(format!("in-process TCP echo on {}, {MSG}-byte messages, no replication", self.addr))
    }

    fn connect(&self) -> Result<Box<dyn Writer>> {
        let s = TcpStream::connect(self.addr)?;
        s.set_nodelay(true)?;
        Ok(Box::new(EchoWriter { s, b: [7u8; MSG] }))
    }
}

struct EchoWriter {
    s: TcpStream,
    b: [u8; MSG],
}

impl Writer for EchoWriter {
    fn write(&mut self, _: &Session) -> Result<()> {
        self.s.write_all(&self.b)?;
        self.s.read_exact(&mut self.b)?;
        Ok(())
    }
}
