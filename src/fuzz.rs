//! Fuzz targets: one entry point per decoder of outside input, each taking arbitrary bytes.
//!
//! The same functions are driven two ways: by `cargo fuzz` (the `fuzz/` crate, nightly, run
//! by hand) and by proptest in the normal test run (stable, CI), so a finding of either is a
//! failing test of both. A target panics only when a decoder broke one of its promises:
//! never panic, never accept more than its link's limit, and give back what was encoded.
//!
//! Targets: [`frame`] (length-prefixed frames), [`plain_link`] (a plain connection as the
//! Unix socket reads it), [`secure_handshake`] and [`secure_transport`] (the secure
//! channel's responder and its transport messages after a genuine handshake), [`api`],
//! [`agent`] and [`peer`] (each link's messages), [`config`] (the configuration loader on
//! one file's text), [`tl_config`] (`tl-config` path and value parsing).
//!
//! Must never: touch the network or a file outside a temporary directory, or depend on
//! the clock.

use crate::proto::frame::{self, Status};
use crate::proto::secure::{self, Secret, PROLOGUE_AGENT};
use crate::proto::ProtoError;
use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

/// Every target, by name (the `fuzz/` crate has one binary per entry).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("frame", frame),
    ("plain_link", plain_link),
    ("secure_handshake", secure_handshake),
    ("secure_transport", secure_transport),
    ("api", api),
    ("agent", agent),
    ("peer", peer),
    ("config", config),
    ("tl_config", tl_config),
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime")
}

/// Frames: `check` and `parse` agree, never read past the buffer, and refuse what is over
/// the maximum from the header alone.
pub fn frame(data: &[u8]) {
    let max = data.first().map_or(16, |b| usize::from(*b) * 4);
    let data = data.get(1..).unwrap_or(&[]);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        let checked = frame::check(&buf, max);
        match frame::parse(&mut buf, max) {
            Ok(Some(payload)) => {
                assert!(payload.len() <= max);
                assert_eq!(checked.ok(), Some(Status::Complete { len: payload.len() }));
                assert_eq!(buf.len(), before - frame::HEADER_LEN - payload.len());
                let mut again = BytesMut::new();
                frame::encode(&payload, max, &mut again).expect("a parsed payload encodes again");
                assert_eq!(frame::parse(&mut again, max).ok().flatten(), Some(payload));
            }
            Ok(None) => {
                assert!(matches!(checked, Ok(Status::Incomplete { .. })));
                assert_eq!(buf.len(), before, "an incomplete frame is not consumed");
                break;
            }
            Err(ProtoError::FrameTooLarge { len, max: m }) => {
                assert!(len > max && m == max);
                break;
            }
            Err(e) => panic!("unexpected frame error {e:?}"),
        }
    }
}

/// A plain connection reading API requests (the Unix socket) with its request limit.
pub fn plain_link(data: &[u8]) {
    use crate::proto::api::{ApiRequest, MAX_REQUEST};
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
        let mut conn = crate::proto::PlainConn::with_limits(r, MAX_REQUEST, MAX_REQUEST);
        loop {
            match conn.recv::<ApiRequest>().await {
                Ok(Some(req)) => check_request(&req),
                Ok(None) => break,
                Err(ProtoError::Malformed(_)) => continue,
                Err(ProtoError::FrameTooLarge { len, max }) => {
                    assert!(len > max && max == MAX_REQUEST);
                    break;
                }
                Err(_) => break,
            }
        }
        // The writer may wait for room the reader no longer makes.
        drop(conn);
        let _ = writer.await;
    });
}

fn secret() -> Secret {
    Secret::from_bytes(b"fuzz secret")
}

/// The secure channel's responder fed arbitrary bytes as the initiator's opening: it must
/// refuse cleanly (nothing it returns comes from unauthenticated data).
pub fn secure_handshake(data: &[u8]) {
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
            // Keep the read side open until the responder is done answering.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut w, &mut sink).await;
        });
        let r = secure::accept(r, &secret(), PROLOGUE_AGENT).await;
        // Only an initiator holding the secret gets through; arbitrary bytes never do.
        assert!(r.is_err(), "a handshake from arbitrary bytes succeeded");
        drop(r);
        let _ = writer.await;
    });
}

/// Transport messages after a genuine handshake. The first byte picks the receive limit;
/// the rest is cut into pieces, each sent as a transport message encrypted with the real
/// key (its first byte being the fragment flag) or, when the piece starts with an odd byte,
/// as a raw frame of forged ciphertext. Nothing forged is ever accepted, and nothing over
/// the limit is reassembled.
pub fn secure_transport(data: &[u8]) {
    let limit = data.first().map_or(1024, |b| 64 + usize::from(*b) * 512);
    let data = data.get(1..).unwrap_or(&[]).to_vec();
    runtime().block_on(async move {
        let (c_end, s_end) = tokio::io::duplex(256 * 1024);
        let server = tokio::spawn(async move {
            let mut s = secure::accept(s_end, &secret(), PROLOGUE_AGENT).await?.with_limits(limit, limit);
            loop {
                match s.recv::<serde_json::Value>().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok::<(), ProtoError>(()),
                    Err(ProtoError::Malformed(_)) => continue,
                    Err(ProtoError::MessageTooLarge { len, max }) => {
                        assert!(len > max && max == limit);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        let client = secure::connect(c_end, &secret(), PROLOGUE_AGENT).await.expect("handshake");
        let (_, mut w) = client.split_with(tokio::io::split);
        let writer = tokio::spawn(async move {
            let mut forged = false;
            for piece in data.chunks(97) {
                if piece[0] % 2 == 1 {
                    forged = true;
                    if w.send_raw_frame(&piece[1..]).await.is_err() {
                        break;
                    }
                } else if w.send_transport_message(&piece[1..]).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
            forged
        });
        let served = server.await.expect("the server task");
        let forged = writer.await.expect("the writer task");
        if let Err(e) = served {
            // Only a forgery, or a genuine message the protocol does not allow, ends the link.
            assert!(
                matches!(e, ProtoError::Decrypt | ProtoError::Violation(_) | ProtoError::Truncated { .. }),
                "unexpected error {e:?} (forged: {forged})"
            );
        }
    });
}

/// A decoded message re-encodes to something that decodes to the same message.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let json = serde_json::to_vec(msg).expect("a decoded message encodes");
    let back: T = serde_json::from_slice(&json).expect("an encoded message decodes");
    assert_eq!(&back, msg);
}

fn check_request(req: &crate::proto::api::ApiRequest) {
    // Whatever the API accepts stays within the bounds of what may be stored.
    if crate::api::check_request(req).is_ok() {
        if let crate::proto::api::ApiRequest::SessionPut { session } = req {
            assert!(session.check_bounds().is_ok());
        }
        if let crate::proto::api::ApiRequest::Connect { client_address: Some(a), .. } = req {
            assert!(a.is_empty() || crate::model::valid_client_address(a));
        }
    }
}

/// API requests and replies as JSON.
pub fn api(data: &[u8]) {
    use crate::proto::api::{ApiReply, ApiRequest};
    if let Ok(req) = serde_json::from_slice::<ApiRequest>(data) {
        round_trip(&req);
        check_request(&req);
    }
    if let Ok(reply) = serde_json::from_slice::<ApiReply>(data) {
        round_trip(&reply);
    }
}

/// Agent-link and report-link messages as JSON.
pub fn agent(data: &[u8]) {
    use crate::proto::agent::{AgentReply, AgentReport, AgentRequest, ReportAck};
    if let Ok(m) = serde_json::from_slice::<AgentRequest>(data) {
        round_trip(&m);
    }
    if let Ok(m) = serde_json::from_slice::<AgentReply>(data) {
        round_trip(&m);
    }
    if let Ok(m) = serde_json::from_slice::<AgentReport>(data) {
        round_trip(&m);
    }
    if let Ok(m) = serde_json::from_slice::<ReportAck>(data) {
        round_trip(&m);
    }
}

/// Peer-link messages as JSON; every record's size bound holds.
pub fn peer(data: &[u8]) {
    use crate::proto::peer::PeerMsg;
    if let Ok(m) = serde_json::from_slice::<PeerMsg>(data) {
        round_trip(&m);
        let records: Vec<&crate::model::Record> = match &m {
            PeerMsg::Changes { records } => records.iter().map(|c| &c.record).collect(),
            PeerMsg::SnapshotChunk { records } => records.iter().collect(),
            _ => vec![],
        };
        for r in records {
            let real = serde_json::to_vec(r).expect("a record encodes").len();
            assert!(real <= r.json_len_bound(), "record of {real} bytes over its bound {}", r.json_len_bound());
        }
    }
}

/// The configuration loader on one file's text (loading never resolves names).
pub fn config(data: &[u8]) {
    use crate::config::load::{Settings, Source};
    let text = String::from_utf8_lossy(data).into_owned();
    let dir = std::path::Path::new("/nonexistent-vsm-fuzz");
    let sources = [Source { file: dir.join("vsm.toml"), text }];
    let settings = Settings::from_sources(dir, &sources);
    if let Err(errors) = settings.build() {
        assert!(!errors.to_string().is_empty(), "an error without words");
    }
}

/// `tl-config PATH=VALUE`: path lookup, then the key's value parsing; a parsed value prints
/// and parses back to itself.
pub fn tl_config(data: &[u8]) {
    use crate::config::keys;
    let text = String::from_utf8_lossy(data);
    let (path, value) = text.split_once('=').unwrap_or((&text, ""));
    let _ = keys::suggest(path);
    let Ok(km) = keys::lookup(path) else { return };
    assert!(km.path.starts_with('/'));
    if let Ok(v) = km.def.ty.parse_text(value) {
        let shown = v.display();
        let again = km.def.ty.parse_text(&shown).expect("a printed value parses again");
        assert_eq!(again, v, "{path}={value:?} printed as {shown:?}");
        let toml = v.to_toml();
        assert_eq!(km.def.ty.parse_toml(&toml).as_ref(), Ok(&v), "{path}={value:?} as toml {toml}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Structured seeds: valid inputs of each target, so the random mutations below start
    /// from something the decoder gets past its first byte with.
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        use crate::proto::api::ApiRequest;
        match target {
            "frame" => vec![vec![4, 0, 0, 0, 3, b'a', b'b', b'c'], vec![0, 0, 0, 0, 0]],
            "plain_link" => {
                let req = serde_json::to_vec(&ApiRequest::HaStatus).unwrap();
                let mut v = (req.len() as u32).to_be_bytes().to_vec();
                v.extend(req);
                vec![v]
            }
            "api" => vec![
                br#"{"op":"connect","user":null,"new":false,"terminate_existing":false,"geometry":"1x1","client_address":"h"}"#.to_vec(),
                br#"{"reply":"ok","message":"x"}"#.to_vec(),
            ],
            "agent" => vec![br#"{"op":"start","session_id":"a","user":"u","geometry":null}"#.to_vec()],
            "peer" => vec![
                br#"{"type":"snapshot_chunk","records":[{"id":"a","version":{"hlc":{"wall_ms":1,"logical":0},"node":"n"},"session":null}]}"#.to_vec(),
            ],
            "config" => vec![b"[HA]\nenabled = true\nnodes = [\"a\", \"b\"]\n[subclusters.x]\nagents = [\"h\"]\n".to_vec()],
            "tl_config" => vec![b"/HA/sync_timeout=2s".to_vec(), b"/subclusters/x/agents=a b".to_vec()],
            _ => vec![vec![]],
        }
    }

    fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds(target);
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            (0..seeds.len(), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)).prop_map(
                move |(i, edits)| {
                    let mut s = seeds[i].clone();
                    for (at, b) in edits {
                        if s.is_empty() {
                            s.push(b);
                        } else {
                            let at = at % s.len();
                            s[at] = b;
                        }
                    }
                    s
                }
            ),
        ]
    }

    fn config_cases() -> ProptestConfig {
        ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() }
    }

    macro_rules! target_tests {
        ($($name:ident),*) => {$(
            proptest! {
                #![proptest_config(config_cases())]
                #[test]
                fn $name(data in mutated(stringify!($name))) {
                    super::$name(&data);
                }
            }
        )*};
    }

    target_tests!(frame, plain_link, secure_handshake, secure_transport, api, agent, peer, config, tl_config);

    #[test]
    fn every_target_is_listed_and_takes_every_seed() {
        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "frame",
                "plain_link",
                "secure_handshake",
                "secure_transport",
                "api",
                "agent",
                "peer",
                "config",
                "tl_config"
            ]
        );
        for (name, f) in TARGETS {
            for s in seeds(name) {
                f(&s);
            }
        }
    }
}
