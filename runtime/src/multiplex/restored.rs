//! The real port a restored process's socket gets: the one its connections
//! use when the restore owns them (exactly that, or the restore fails),
//! else one chosen as the application's own bind would get it — which is
//! how every clone gets its own real port for each listening socket while
//! its template's stay taken. Decided through the [`Kernel`] seam like the
//! notified calls, so `tests.rs` drives it with the same double.

use std::net::SocketAddr;
use std::time::Instant;

use appshot_snapshot::ListenError;
use appshot_vpm::Protocol;

use super::policy::{Kernel, Policy, ALLOCATION_RETRY};

impl Policy {
    /// Binds a restored TCP socket for `addr`, the address its application
    /// bound (port 0: never bound). `real_port` is the real port to take
    /// again, 0 for any.
    pub fn bind_restored_tcp<K: Kernel>(
        &self,
        kernel: &K,
        socket: &K::Socket,
        addr: SocketAddr,
        real_port: u16,
    ) -> Result<(), ListenError> {
        let port = addr.port();
        let failed = |error| ListenError::Socket {
            call: "bind",
            port,
            error: std::io::Error::from_raw_os_error(error),
        };
        let multiplexed = port != 0 && self.settings.multiplexed.contains(port);
        if multiplexed && real_port != 0 {
            return match self.allocate(kernel, socket, Protocol::Tcp, addr, Some(real_port)) {
                Ok(Some(_)) => Ok(()),
                Ok(None) | Err(libc::EADDRINUSE) => Err(ListenError::RealPortTaken {
                    real_port,
                    virtual_port: port,
                }),
                Err(e) => Err(failed(e)),
            };
        }
        if multiplexed {
            return self.allocate_waiting(kernel, socket, Protocol::Tcp, addr);
        }
        // An unbound socket stays unbound; an address without a port
        // (bound to an IP only) is bound again as it was.
        if port != 0 || !addr.ip().is_unspecified() {
            kernel.bind(socket, addr).map_err(failed)?;
        }
        Ok(())
    }

    /// Binds a restored UDP socket for `addr`, the address its application
    /// bound: a real port chosen as its own bind would get one when
    /// datagrams are routed by AID, else the address itself.
    pub fn bind_restored_udp<K: Kernel>(
        &self,
        kernel: &K,
        socket: &K::Socket,
        addr: SocketAddr,
    ) -> Result<(), ListenError> {
        let s = &self.settings;
        let port = addr.port();
        if s.route_udp && port != 0 && s.multiplexed.contains(port) {
            return self.allocate_waiting(kernel, socket, Protocol::Udp, addr);
        }
        kernel.bind(socket, addr).map_err(|e| ListenError::Socket {
            call: "bind",
            port,
            error: std::io::Error::from_raw_os_error(e),
        })
    }

    /// Any free real port for `addr`, waiting for one up to the
    /// allocation timeout.
    fn allocate_waiting<K: Kernel>(
        &self,
        kernel: &K,
        socket: &K::Socket,
        protocol: Protocol,
        addr: SocketAddr,
    ) -> Result<(), ListenError> {
        let s = &self.settings;
        let deadline = Instant::now() + s.allocation_timeout;
        loop {
            match self.allocate(kernel, socket, protocol, addr, None) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(ALLOCATION_RETRY),
                Ok(None) => {
                    return Err(ListenError::NoRealPort {
                        virtual_port: addr.port(),
                        start: s.range.start,
                        end: s.range.end,
                    })
                }
                Err(e) => {
                    return Err(ListenError::Socket {
                        call: "bind",
                        port: addr.port(),
                        error: std::io::Error::from_raw_os_error(e),
                    })
                }
            }
        }
    }
}
