//! Socket addresses as raw bytes in a supervised task's memory: decoded from
//! what it passed to bind/connect, encoded for what getsockname/getpeername
//! return. Pure byte work, so it is tested without any process.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
/// Largest address a task can pass (`sizeof(struct sockaddr_storage)`);
/// the kernel refuses longer ones with EINVAL.
pub const MAX_LEN: usize = 128;

/// Decodes an AF_INET/AF_INET6 address the way the kernel's inet bind and
/// connect do for a socket of `domain`, returning the errno the kernel would
/// give for a malformed one.
pub fn decode(domain: i32, bytes: &[u8]) -> Result<SocketAddr, i32> {
    if bytes.len() < 2 {
        return Err(libc::EINVAL);
    }
    let family = i32::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
    match domain {
        libc::AF_INET => {
            if bytes.len() < SOCKADDR_IN_LEN {
                return Err(libc::EINVAL);
            }
            if family != libc::AF_INET {
                return Err(libc::EAFNOSUPPORT);
            }
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 => {
            // The kernel accepts the 24-byte RFC 2133 form without scope id.
            if bytes.len() < 24 {
                return Err(libc::EINVAL);
            }
            if family != libc::AF_INET6 {
                return Err(libc::EAFNOSUPPORT);
            }
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let flowinfo = u32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes"));
            let ip: [u8; 16] = bytes[8..24].try_into().expect("16 bytes");
            let scope_id = match bytes.get(24..28) {
                Some(s) => u32::from_ne_bytes(s.try_into().expect("4 bytes")),
                None => 0,
            };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope_id,
            )))
        }
        _ => Err(libc::EAFNOSUPPORT),
    }
}

/// Decodes the address of a bind as the kernel's inet bind does, which
/// (for compatibility) takes `AF_UNSPEC` with `INADDR_ANY` on an IPv4
/// socket for `AF_INET`: such a bind must be multiplexed like any other.
pub fn decode_bind(domain: i32, bytes: &[u8]) -> Result<SocketAddr, i32> {
    let unspec_any = domain == libc::AF_INET
        && bytes.len() >= SOCKADDR_IN_LEN
        && i32::from(u16::from_ne_bytes([bytes[0], bytes[1]])) == libc::AF_UNSPEC
        && bytes[4..8] == [0; 4];
    if unspec_any {
        let mut as_inet = bytes.to_vec();
        as_inet[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        return decode(domain, &as_inet);
    }
    decode(domain, bytes)
}

/// Encodes `addr` as the kernel lays out `sockaddr_in`/`sockaddr_in6`.
pub fn encode(addr: &SocketAddr) -> Vec<u8> {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = Vec::with_capacity(SOCKADDR_IN_LEN);
            b.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&a.ip().octets());
            b.resize(SOCKADDR_IN_LEN, 0);
            b
        }
        SocketAddr::V6(a) => {
            let mut b = Vec::with_capacity(SOCKADDR_IN6_LEN);
            b.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&a.flowinfo().to_ne_bytes());
            b.extend_from_slice(&a.ip().octets());
            b.extend_from_slice(&a.scope_id().to_ne_bytes());
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        for s in ["127.0.0.1:9000", "[::1]:6379", "[::]:0", "[fe80::1%2]:80"] {
            let a: SocketAddr = s.parse().unwrap();
            let domain = if a.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            assert_eq!(decode(domain, &encode(&a)).unwrap(), a, "{s}");
        }
    }

    #[test]
    fn port_is_network_order() {
        let b = encode(&"0.0.0.0:9000".parse().unwrap());
        assert_eq!(&b[2..4], &[0x23, 0x28]);
    }

    #[test]
    fn malformed_addresses_get_the_kernels_errno() {
        let v4 = encode(&"127.0.0.1:80".parse().unwrap());
        assert_eq!(decode(libc::AF_INET, &v4[..8]), Err(libc::EINVAL));
        assert_eq!(decode(libc::AF_INET, &[]), Err(libc::EINVAL));
        let v6 = encode(&"[::1]:80".parse().unwrap());
        assert_eq!(decode(libc::AF_INET, &v6[..16]), Err(libc::EAFNOSUPPORT));
        assert_eq!(decode(libc::AF_INET6, &v6[..24]).unwrap().port(), 80);
        assert_eq!(decode(libc::AF_INET6, &v4), Err(libc::EINVAL));
    }

    #[test]
    fn unspec_any_binds_as_inet_like_the_kernel() {
        let mut b = encode(&"0.0.0.0:80".parse().unwrap());
        b[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
        assert_eq!(decode(libc::AF_INET, &b), Err(libc::EAFNOSUPPORT));
        assert_eq!(
            decode_bind(libc::AF_INET, &b),
            Ok("0.0.0.0:80".parse().unwrap())
        );
        // Only with INADDR_ANY, and only on IPv4 sockets.
        let mut specific = encode(&"127.0.0.1:80".parse().unwrap());
        specific[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
        assert_eq!(
            decode_bind(libc::AF_INET, &specific),
            Err(libc::EAFNOSUPPORT)
        );
        let mut v6 = encode(&"[::]:80".parse().unwrap());
        v6[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
        assert_eq!(decode_bind(libc::AF_INET6, &v6), Err(libc::EAFNOSUPPORT));
    }
}
