//! Cross-host negotiation (cooperative multiplexing over two hosts): a
//! supervised client's host asks the server host's agent which real port
//! serves (AID, virtual port). This module is the I/O-free part: the wire
//! format, the authentication, the replay window, and what agent and client
//! do with a frame. Sockets and threads live in the runtime.

pub mod auth;
pub mod message;
pub mod replay;

use std::io::{self, Read};

pub use auth::{AuthError, ClusterKey, KeyError};
pub use message::{Answer, DecodeError, Request, Response};
pub use replay::{Rejection, ReplayWindow};

use message::{decode_header, Kind, Nonce, HEADER_LEN, MAX_FRAME};

/// The default TCP port agents listen on.
pub const DEFAULT_AGENT_PORT: u16 = 7946;
/// How far a peer's clock may be from ours.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Nonces remembered at most; see [`ReplayWindow::new`].
pub const REPLAY_CAPACITY: usize = 262_144;

/// Why the agent refused a frame. The peer is told none of it (it gets the
/// constant deny frame); the agent logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Auth(AuthError),
    #[error("authenticated but malformed request: {0}")]
    Malformed(DecodeError),
    #[error("a {0:?} frame where a request belongs")]
    UnexpectedKind(Kind),
    #[error("{0}")]
    Replay(Rejection),
}

/// What the agent did with one frame: the bytes to send back, and what it
/// decided (for the log).
#[derive(Debug)]
pub struct Handled {
    pub reply: Vec<u8>,
    pub outcome: Result<(Request, Answer), Refusal>,
}

/// The agent's decisions over a stream of frames: authentication first,
/// then parsing, then freshness, and only then the registry (`lookup`).
#[derive(Debug)]
pub struct AgentCore {
    key: ClusterKey,
    window: ReplayWindow,
}

impl AgentCore {
    pub fn new(key: ClusterKey) -> AgentCore {
        AgentCore {
            key,
            window: ReplayWindow::new(MAX_SKEW_MS, REPLAY_CAPACITY),
        }
    }

    pub fn handle(
        &mut self,
        frame: &[u8],
        now_ms: u64,
        lookup: impl FnOnce(&Request) -> Answer,
    ) -> Handled {
        match self.decide(frame, now_ms) {
            Ok(request) => {
                let answer = lookup(&request);
                let response = Response {
                    request_nonce: request.nonce,
                    timestamp_ms: now_ms,
                    answer,
                };
                Handled {
                    reply: self.key.seal(Kind::Response, &response.encode_body()),
                    outcome: Ok((request, answer)),
                }
            }
            Err(refusal) => Handled {
                reply: message::deny_frame(),
                outcome: Err(refusal),
            },
        }
    }

    fn decide(&mut self, frame: &[u8], now_ms: u64) -> Result<Request, Refusal> {
        let opened = self.key.open(frame).map_err(Refusal::Auth)?;
        if opened.header.kind != Kind::Request {
            return Err(Refusal::UnexpectedKind(opened.header.kind));
        }
        let request = Request::decode_body(opened.body).map_err(Refusal::Malformed)?;
        self.window
            .admit(request.nonce, request.timestamp_ms, now_ms)
            .map_err(Refusal::Replay)?;
        Ok(request)
    }
}

/// The client's side of one exchange.
#[derive(Debug)]
pub struct Exchange {
    nonce: Nonce,
    pub frame: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("{0}")]
    Auth(AuthError),
    #[error("malformed response: {0}")]
    Malformed(DecodeError),
    #[error("a {0:?} frame where a response belongs")]
    UnexpectedKind(Kind),
    #[error("the response answers another request (nonce mismatch)")]
    NonceMismatch,
}

impl Exchange {
    /// A sealed request for `aid` on `dest:virtual_port` over `protocol`,
    /// stamped `now_ms`.
    pub fn new(
        key: &ClusterKey,
        protocol: crate::Protocol,
        dest: std::net::IpAddr,
        virtual_port: u16,
        aid: &str,
        now_ms: u64,
    ) -> Exchange {
        let request = Request {
            nonce: auth::nonce(),
            timestamp_ms: now_ms,
            protocol,
            dest,
            virtual_port,
            aid: aid.to_owned(),
        };
        Exchange {
            nonce: request.nonce,
            frame: key.seal(Kind::Request, &request.encode_body()),
        }
    }

    /// The agent's answer, if `frame` is an authentic response to this
    /// request.
    pub fn answer(&self, key: &ClusterKey, frame: &[u8]) -> Result<Answer, ResponseError> {
        let opened = key.open(frame).map_err(ResponseError::Auth)?;
        if opened.header.kind != Kind::Response {
            return Err(ResponseError::UnexpectedKind(opened.header.kind));
        }
        let response = Response::decode_body(opened.body).map_err(ResponseError::Malformed)?;
        if response.request_nonce != self.nonce {
            return Err(ResponseError::NonceMismatch);
        }
        Ok(response.answer)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// Reads one frame: the header first, checked, then exactly the length it
/// announces. Never buffers more than [`MAX_FRAME`] bytes.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ReadError> {
    let mut frame = vec![0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut frame[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(DecodeError::Truncated {
                    got,
                    want: HEADER_LEN,
                }
                .into())
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = decode_header(&frame)?;
    let total = HEADER_LEN + header.rest_len();
    debug_assert!(total <= MAX_FRAME);
    frame.resize(total, 0);
    r.read_exact(&mut frame[HEADER_LEN..]).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Decode(DecodeError::Truncated {
                got: 0,
                want: total,
            })
        } else {
            ReadError::Io(e)
        }
    })?;
    Ok(frame)
}

#[cfg(test)]
mod tests;
