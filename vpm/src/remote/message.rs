//! The wire format of cross-host negotiation, version 1. Pure encoding and
//! decoding; authentication is [`super::auth`]'s job.
//!
//! Every frame is
//!
//! ```text
//! magic "AVPM" | version u8 | kind u8 | body length u16 BE | body | tag [32]
//! ```
//!
//! where the tag is HMAC-SHA256 over everything before it. The header alone
//! bounds what a reader has to accept, so a peer can never make the agent
//! buffer more than [`MAX_FRAME`] bytes.

use std::net::IpAddr;

use crate::translation::Protocol;

pub const MAGIC: [u8; 4] = *b"AVPM";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
pub const TAG_LEN: usize = 32;
/// Far above the largest valid body (a request with an IPv6 address and a
/// 64-character AID is 110 bytes), far below anything worth exhausting.
pub const MAX_BODY: usize = 256;
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY + TAG_LEN;
pub const NONCE_LEN: usize = 16;
/// The longest AID the configurator accepts.
pub const MAX_AID: usize = 64;

pub type Nonce = [u8; NONCE_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Response = 2,
    /// The agent's one answer to anything it will not serve, identical
    /// whatever the reason, so that a peer without the key learns nothing.
    Deny = 0xEE,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            0xEE => Some(Kind::Deny),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a negotiation frame (bad magic)")]
    BadMagic,
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("body of {0} bytes exceeds the limit of {MAX_BODY}")]
    Oversized(usize),
    #[error("frame truncated: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("malformed {field}: {why}")]
    Field { field: &'static str, why: String },
}

/// The fixed part of a frame, enough to know how many bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub body_len: usize,
}

impl Header {
    /// Bytes after the header: body and tag.
    pub fn rest_len(&self) -> usize {
        self.body_len + TAG_LEN
    }
}

pub fn decode_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            want: HEADER_LEN,
        });
    }
    if bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(DecodeError::Version(bytes[4]));
    }
    let kind = Kind::from_byte(bytes[5]).ok_or(DecodeError::UnknownKind(bytes[5]))?;
    let body_len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    if body_len > MAX_BODY {
        return Err(DecodeError::Oversized(body_len));
    }
    Ok(Header { kind, body_len })
}

/// A frame split into its parts; `signed` is what the tag covers.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub header: Header,
    pub signed: &'a [u8],
    pub body: &'a [u8],
    pub tag: &'a [u8],
}

/// Splits a complete frame; `bytes` must hold exactly one.
pub fn split(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let header = decode_header(bytes)?;
    let want = HEADER_LEN + header.rest_len();
    if bytes.len() < want {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            want,
        });
    }
    if bytes.len() > want {
        return Err(DecodeError::Trailing(bytes.len() - want));
    }
    let signed_len = HEADER_LEN + header.body_len;
    Ok(Frame {
        header,
        signed: &bytes[..signed_len],
        body: &bytes[HEADER_LEN..signed_len],
        tag: &bytes[signed_len..],
    })
}

/// Header and body of a frame of `kind`; the caller appends the tag.
pub fn unsigned_frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    assert!(body.len() <= MAX_BODY, "message bodies are built small");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The agent's refusal: no body, an all-zero tag. Constant, so it says
/// nothing about why.
pub fn deny_frame() -> Vec<u8> {
    let mut out = unsigned_frame(Kind::Deny, &[]);
    out.extend_from_slice(&[0; TAG_LEN]);
    out
}

/// "Which real port serves `aid` on `dest:virtual_port`?"
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub nonce: Nonce,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub protocol: Protocol,
    /// The address the client connects to, as it named it.
    pub dest: IpAddr,
    pub virtual_port: u16,
    pub aid: String,
}

/// IP protocol numbers, as on the wire.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

impl Request {
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        b.push(match self.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        });
        match self.dest {
            IpAddr::V4(a) => {
                b.push(4);
                b.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                b.push(6);
                b.extend_from_slice(&a.octets());
            }
        }
        b.extend_from_slice(&self.virtual_port.to_be_bytes());
        let aid = self.aid.as_bytes();
        assert!(
            aid.len() <= MAX_AID,
            "AIDs are validated before negotiation"
        );
        b.push(aid.len() as u8);
        b.extend_from_slice(aid);
        b
    }

    pub fn decode_body(body: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader::new(body);
        let nonce = r.array::<NONCE_LEN>("nonce")?;
        let timestamp_ms = u64::from_be_bytes(r.array("timestamp")?);
        let protocol = match r.u8("protocol")? {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            p => {
                return Err(field(
                    "protocol",
                    format!("{p} is neither TCP (6) nor UDP (17)"),
                ))
            }
        };
        let dest = match r.u8("address family")? {
            4 => IpAddr::from(r.array::<4>("address")?),
            6 => IpAddr::from(r.array::<16>("address")?),
            f => return Err(field("address family", format!("{f} is neither 4 nor 6"))),
        };
        let virtual_port = u16::from_be_bytes(r.array("virtual port")?);
        if virtual_port == 0 {
            return Err(field("virtual port", "0 is never multiplexed".into()));
        }
        let aid_len = usize::from(r.u8("aid length")?);
        if aid_len == 0 || aid_len > MAX_AID {
            return Err(field(
                "aid length",
                format!("{aid_len} not in 1..={MAX_AID}"),
            ));
        }
        let aid = r.take(aid_len, "aid")?;
        if !aid
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return Err(field("aid", "characters outside [A-Za-z0-9._-]".into()));
        }
        let aid = String::from_utf8(aid.to_vec()).expect("checked ASCII");
        r.finish()?;
        Ok(Request {
            nonce,
            timestamp_ms,
            protocol,
            dest,
            virtual_port,
            aid,
        })
    }
}

/// The agent's verdict, as the registry of its host decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An instance of the AID serves the port on `real_port`.
    Ack { real_port: u16 },
    /// Instances serve the port, none of the AID: the connect must fail.
    Refused,
    /// No instance serves the port: connect to it as it is.
    NotMultiplexed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The nonce of the request this answers; binds the two together.
    pub request_nonce: Nonce,
    pub timestamp_ms: u64,
    pub answer: Answer,
}

impl Response {
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(NONCE_LEN + 11);
        b.extend_from_slice(&self.request_nonce);
        b.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        let (status, port) = match self.answer {
            Answer::Ack { real_port } => (0u8, real_port),
            Answer::Refused => (1, 0),
            Answer::NotMultiplexed => (2, 0),
        };
        b.push(status);
        b.extend_from_slice(&port.to_be_bytes());
        b
    }

    pub fn decode_body(body: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(body);
        let request_nonce = r.array::<NONCE_LEN>("nonce")?;
        let timestamp_ms = u64::from_be_bytes(r.array("timestamp")?);
        let status = r.u8("status")?;
        let port = u16::from_be_bytes(r.array("real port")?);
        let answer = match (status, port) {
            (0, 0) => return Err(field("real port", "0 in an acknowledgement".into())),
            (0, real_port) => Answer::Ack { real_port },
            (1, 0) => Answer::Refused,
            (2, 0) => Answer::NotMultiplexed,
            (1 | 2, p) => return Err(field("real port", format!("{p} without an ack"))),
            (s, _) => return Err(field("status", format!("unknown status {s}"))),
        };
        r.finish()?;
        Ok(Response {
            request_nonce,
            timestamp_ms,
            answer,
        })
    }
}

fn field(field: &'static str, why: String) -> DecodeError {
    DecodeError::Field { field, why }
}

/// Bounds-checked cursor: every read names the field it was after.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(field(
                what,
                format!("needs {n} bytes, {} left", self.bytes.len() - self.pos),
            ));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dest: &str, aid: &str) -> Request {
        Request {
            nonce: [7; NONCE_LEN],
            timestamp_ms: 1_700_000_000_123,
            protocol: Protocol::Tcp,
            dest: dest.parse().unwrap(),
            virtual_port: 9000,
            aid: aid.into(),
        }
    }

    #[test]
    fn requests_round_trip_for_both_families() {
        for dest in ["10.200.1.1", "fd00::1"] {
            let req = request(dest, "shop_1.v2-x");
            assert_eq!(Request::decode_body(&req.encode_body()), Ok(req));
        }
        let longest = request("10.0.0.1", &"a".repeat(MAX_AID));
        assert!(longest.encode_body().len() <= MAX_BODY);
    }

    #[test]
    fn responses_round_trip() {
        for answer in [
            Answer::Ack { real_port: 20001 },
            Answer::Refused,
            Answer::NotMultiplexed,
        ] {
            let resp = Response {
                request_nonce: [9; NONCE_LEN],
                timestamp_ms: 5,
                answer,
            };
            assert_eq!(Response::decode_body(&resp.encode_body()), Ok(resp));
        }
    }

    #[test]
    fn every_truncation_of_a_request_is_an_error() {
        let body = request("fd00::1", "abc").encode_body();
        for n in 0..body.len() {
            assert!(
                Request::decode_body(&body[..n]).is_err(),
                "prefix {n} accepted"
            );
        }
        let mut long = body.clone();
        long.push(0);
        assert_eq!(Request::decode_body(&long), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn udp_requests_round_trip() {
        let req = Request {
            protocol: Protocol::Udp,
            ..request("10.200.1.1", "dns")
        };
        assert_eq!(Request::decode_body(&req.encode_body()), Ok(req));
    }

    #[test]
    fn malformed_request_fields_are_named() {
        let good = request("10.0.0.1", "abc").encode_body();
        let family_at = NONCE_LEN + 8 + 1;
        let cases: Vec<(usize, u8, &str)> = vec![
            (NONCE_LEN + 8, 1, "protocol"),
            (family_at, 5, "address family"),
            (family_at + 1 + 4, 0, "virtual port"),
            (family_at + 1 + 4 + 2, 0, "aid length"),
            (family_at + 1 + 4 + 2, 65, "aid length"),
            (family_at + 1 + 4 + 2 + 1, b'/', "aid"),
        ];
        for (at, value, want) in cases {
            let mut b = good.clone();
            b[at] = value;
            if want == "virtual port" {
                b[at + 1] = 0;
            }
            match Request::decode_body(&b) {
                Err(DecodeError::Field { field, .. }) => assert_eq!(field, want, "byte {at}"),
                Err(DecodeError::Trailing(_)) if want == "aid length" => {}
                other => panic!("byte {at} = {value}: {other:?}"),
            }
        }
    }

    #[test]
    fn responses_with_inconsistent_status_and_port_are_refused() {
        let mut b = Response {
            request_nonce: [0; NONCE_LEN],
            timestamp_ms: 0,
            answer: Answer::Refused,
        }
        .encode_body();
        let port_at = NONCE_LEN + 8 + 1;
        b[port_at + 1] = 80;
        assert!(Response::decode_body(&b).is_err(), "refusal with a port");
        b[port_at - 1] = 0;
        b[port_at + 1] = 0;
        assert!(Response::decode_body(&b).is_err(), "ack of port 0");
        b[port_at - 1] = 3;
        assert!(Response::decode_body(&b).is_err(), "unknown status");
    }

    #[test]
    fn headers_are_checked_before_any_body_is_read() {
        let mut frame = unsigned_frame(Kind::Request, &[1, 2, 3]);
        assert_eq!(
            decode_header(&frame),
            Ok(Header {
                kind: Kind::Request,
                body_len: 3
            })
        );
        frame[0] = b'X';
        assert_eq!(decode_header(&frame), Err(DecodeError::BadMagic));
        frame[0] = b'A';
        frame[4] = 2;
        assert_eq!(decode_header(&frame), Err(DecodeError::Version(2)));
        frame[4] = VERSION;
        frame[5] = 3;
        assert_eq!(decode_header(&frame), Err(DecodeError::UnknownKind(3)));
        frame[5] = Kind::Request as u8;
        frame[6..8].copy_from_slice(&((MAX_BODY + 1) as u16).to_be_bytes());
        assert_eq!(
            decode_header(&frame),
            Err(DecodeError::Oversized(MAX_BODY + 1))
        );
        assert!(matches!(
            decode_header(&frame[..5]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn split_wants_exactly_one_frame() {
        let mut frame = unsigned_frame(Kind::Response, &[1, 2]);
        assert!(matches!(split(&frame), Err(DecodeError::Truncated { .. })));
        frame.extend_from_slice(&[0; TAG_LEN]);
        let parts = split(&frame).unwrap();
        assert_eq!(parts.body, &[1, 2]);
        assert_eq!(parts.signed.len(), HEADER_LEN + 2);
        assert_eq!(parts.tag.len(), TAG_LEN);
        frame.push(0);
        assert_eq!(split(&frame).err(), Some(DecodeError::Trailing(1)));
        assert_eq!(split(&deny_frame()).unwrap().header.kind, Kind::Deny);
    }
}
