use std::io::Cursor;
use std::net::IpAddr;
use std::path::Path;

use super::message::{deny_frame, Kind, MAX_BODY, MAX_FRAME};
use super::*;
use crate::Protocol;

const NOW: u64 = 1_700_000_000_000;

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes(vec![byte; 32], Path::new("k")).unwrap()
}

fn dest() -> IpAddr {
    "10.200.1.1".parse().unwrap()
}

/// The registry of the agent's host in miniature: `a` is served on 20001,
/// port 9000 is multiplexed for other AIDs, 8080 is not at all.
fn lookup(req: &Request) -> Answer {
    match (req.virtual_port, req.aid.as_str()) {
        (9000, "a") => Answer::Ack { real_port: 20001 },
        (9000, _) => Answer::Refused,
        _ => Answer::NotMultiplexed,
    }
}

#[test]
fn an_authentic_request_gets_the_registry_answer_bound_to_its_nonce() {
    let mut agent = AgentCore::new(key(1));
    for (aid, port, want) in [
        ("a", 9000, Answer::Ack { real_port: 20001 }),
        ("z", 9000, Answer::Refused),
        ("a", 8080, Answer::NotMultiplexed),
    ] {
        let ex = Exchange::new(&key(1), Protocol::Tcp, dest(), port, aid, NOW);
        let handled = agent.handle(&ex.frame, NOW + 3, lookup);
        let (req, answer) = handled.outcome.expect("served");
        assert_eq!(
            (req.aid.as_str(), req.virtual_port, answer),
            (aid, port, want)
        );
        assert_eq!(ex.answer(&key(1), &handled.reply), Ok(want));
        // Another request's response does not answer this one.
        let other = Exchange::new(&key(1), Protocol::Tcp, dest(), port, aid, NOW);
        assert_eq!(
            other.answer(&key(1), &handled.reply),
            Err(ResponseError::NonceMismatch)
        );
    }
}

#[test]
fn a_wrong_key_gets_the_constant_denial_whatever_it_asks() {
    let mut agent = AgentCore::new(key(1));
    let mut replies = Vec::new();
    for (aid, port) in [("a", 9000), ("z", 9000), ("a", 8080)] {
        let ex = Exchange::new(&key(2), Protocol::Tcp, dest(), port, aid, NOW);
        let handled = agent.handle(&ex.frame, NOW, lookup);
        assert_eq!(
            handled.outcome.unwrap_err(),
            Refusal::Auth(AuthError::BadMac)
        );
        assert_eq!(
            ex.answer(&key(2), &handled.reply),
            Err(ResponseError::Auth(AuthError::Denied))
        );
        replies.push(handled.reply);
    }
    // Existing AID, unknown AID, unserved port: indistinguishable.
    assert!(replies.iter().all(|r| *r == deny_frame()));
}

#[test]
fn a_forged_response_is_not_believed() {
    let ex = Exchange::new(&key(1), Protocol::Tcp, dest(), 9000, "a", NOW);
    let mut forger = AgentCore::new(key(2));
    let forged = key(2).seal(
        Kind::Response,
        &Response {
            request_nonce: [0; 16],
            timestamp_ms: NOW,
            answer: Answer::Ack { real_port: 1 },
        }
        .encode_body(),
    );
    assert_eq!(
        ex.answer(&key(1), &forged),
        Err(ResponseError::Auth(AuthError::BadMac))
    );
    // Nor is a request echoed back as if it were a response.
    let echoed = forger.handle(&ex.frame, NOW, lookup).reply;
    assert!(ex.answer(&key(1), &echoed).is_err());
    assert!(ex.answer(&key(1), &ex.frame).is_err());
}

#[test]
fn replays_and_stale_requests_are_refused() {
    let mut agent = AgentCore::new(key(1));
    let ex = Exchange::new(&key(1), Protocol::Tcp, dest(), 9000, "a", NOW);
    assert!(agent.handle(&ex.frame, NOW, lookup).outcome.is_ok());
    let again = agent.handle(&ex.frame, NOW + 10, lookup);
    assert_eq!(
        again.outcome.unwrap_err(),
        Refusal::Replay(Rejection::Replayed)
    );
    assert_eq!(again.reply, deny_frame());

    let old = Exchange::new(
        &key(1),
        Protocol::Tcp,
        dest(),
        9000,
        "a",
        NOW - MAX_SKEW_MS - 1,
    );
    assert!(matches!(
        agent.handle(&old.frame, NOW, lookup).outcome,
        Err(Refusal::Replay(Rejection::Stale { .. }))
    ));
    let future = Exchange::new(
        &key(1),
        Protocol::Tcp,
        dest(),
        9000,
        "a",
        NOW + MAX_SKEW_MS + 1,
    );
    assert!(matches!(
        agent.handle(&future.frame, NOW, lookup).outcome,
        Err(Refusal::Replay(Rejection::Stale { .. }))
    ));
}

#[test]
fn authenticated_frames_of_the_wrong_kind_or_shape_are_refused() {
    let mut agent = AgentCore::new(key(1));
    let response = key(1).seal(Kind::Response, &[0; 27]);
    assert_eq!(
        agent.handle(&response, NOW, lookup).outcome.unwrap_err(),
        Refusal::UnexpectedKind(Kind::Response)
    );
    let garbage = key(1).seal(Kind::Request, b"not a request");
    assert!(matches!(
        agent.handle(&garbage, NOW, lookup).outcome,
        Err(Refusal::Malformed(_))
    ));
}

/// xorshift64*: deterministic, dependency-free randomness for the property
/// test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_frames_never_panic_never_get_served_and_leave_the_agent_working() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut agent = AgentCore::new(key(1));
    for round in 0..5_000 {
        let ex = Exchange::new(&key(1), Protocol::Tcp, dest(), 9000, "a", NOW);
        let mut frame = ex.frame.clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(frame.len());
                frame[at] ^= 1 << rng.below(8);
            }
            1 => frame.truncate(rng.below(frame.len())),
            2 => frame.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8)),
            _ => {
                frame = (0..rng.below(MAX_FRAME + 64))
                    .map(|_| rng.next() as u8)
                    .collect()
            }
        }
        let handled = agent.handle(&frame, NOW, lookup);
        assert!(handled.outcome.is_err(), "round {round}: {frame:?} served");
        assert_eq!(handled.reply, deny_frame());
        // Through the stream reader too: bounded, and never a panic.
        let _ = read_frame(&mut Cursor::new(&frame));
    }
    let ex = Exchange::new(&key(1), Protocol::Tcp, dest(), 9000, "a", NOW);
    let handled = agent.handle(&ex.frame, NOW, lookup);
    assert_eq!(
        ex.answer(&key(1), &handled.reply),
        Ok(Answer::Ack { real_port: 20001 })
    );
}

#[test]
fn read_frame_takes_one_frame_and_checks_the_header_first() {
    let a = key(1).seal(Kind::Request, b"one");
    let b = key(1).seal(Kind::Request, b"two");
    let mut stream = Cursor::new([a.clone(), b.clone()].concat());
    assert_eq!(read_frame(&mut stream).unwrap(), a);
    assert_eq!(read_frame(&mut stream).unwrap(), b);
    assert!(matches!(read_frame(&mut stream), Err(ReadError::Closed)));

    // An oversized announcement is refused before its body is awaited.
    let mut huge = a[..8].to_vec();
    huge[6..8].copy_from_slice(&((MAX_BODY + 1) as u16).to_be_bytes());
    assert!(matches!(
        read_frame(&mut Cursor::new(huge)),
        Err(ReadError::Decode(DecodeError::Oversized(_)))
    ));
    assert!(matches!(
        read_frame(&mut Cursor::new(&a[..a.len() - 1])),
        Err(ReadError::Decode(DecodeError::Truncated { .. }))
    ));
    assert!(matches!(
        read_frame(&mut Cursor::new(&a[..3])),
        Err(ReadError::Decode(DecodeError::Truncated { .. }))
    ));
}
