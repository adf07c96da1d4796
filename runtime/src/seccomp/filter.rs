//! The seccomp program every supervised task runs under.
//!
//! Socket calls whose outcome depends on port multiplexing go to the
//! supervisor (`SECCOMP_RET_USER_NOTIF`); everything else, the data path
//! included, runs natively. Under [`Routing::Kernel`] only bind does: the
//! cgroup programs decide connect (a TCP Fast Open send's too, which passes
//! the same connect hook), getsockname and getpeername. The program also closes the routes around it:
//! other ABIs (i386, x32) and io_uring.

use std::io::Read;

use appshot_sys::seccomp::{decode_program, SockFilter};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

use crate::error::FilterError;
use crate::net::connroutes::Routing;

/// Syscalls the supervisor emulates for every call.
pub const NOTIFIED: &[&str] = &["bind", "connect", "getsockname", "getpeername"];

/// The syscalls of [`NOTIFIED`] the supervisor still emulates when the
/// kernel routes connects and names: a bind takes a real port and records
/// it in the registry.
pub const NOTIFIED_KERNEL_ROUTED: &[&str] = &["bind"];

/// TCP Fast Open connects inside a send call, which would reach a real port
/// without routing; those calls are trapped only when `MSG_FASTOPEN` is set,
/// so ordinary sends stay on the native data path.
pub const FASTOPEN_SENDS: &[(&str, u32)] = &[("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)];

/// SCTP binds and connects addresses through setsockopt
/// (`SCTP_SOCKOPT_BINDX_ADD`, `SCTP_SOCKOPT_CONNECTX`), out of the
/// multiplexer's sight: INET sockets of that protocol, named or the default
/// of SOCK_SEQPACKET, are not supported, as on a kernel without SCTP.
pub const IPPROTO_SCTP: u64 = 132;

/// io_uring could run socket operations the filter never sees.
pub const DENIED_ENOSYS: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// Builds the BPF program. Any architecture other than native x86_64 (i386
/// via `int 0x80`, and x32 numbers, which libseccomp checks for explicitly)
/// kills the process.
pub fn build(routing: Routing) -> Result<Vec<SockFilter>, FilterError> {
    let err = FilterError::Seccomp;
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    ctx.set_act_badarch(ScmpAction::KillProcess).map_err(err)?;
    if ScmpArch::native() != ScmpArch::X8664 {
        return Err(FilterError::Architecture(ScmpArch::native()));
    }
    let (notified, fastopen_sends) = match routing {
        Routing::Notified => (NOTIFIED, FASTOPEN_SENDS),
        Routing::Kernel => (NOTIFIED_KERNEL_ROUTED, &[][..]),
    };
    for name in notified {
        let sc = ScmpSyscall::from_name(name).map_err(err)?;
        ctx.add_rule(ScmpAction::Notify, sc).map_err(err)?;
    }
    for (name, flags_arg) in fastopen_sends {
        let sc = ScmpSyscall::from_name(name).map_err(err)?;
        let fastopen = libc::MSG_FASTOPEN as u64;
        let cmp = ScmpArgCompare::new(*flags_arg, ScmpCompareOp::MaskedEqual(fastopen), fastopen);
        ctx.add_rule_conditional(ScmpAction::Notify, sc, &[cmp])
            .map_err(err)?;
    }
    // The kernel reads these arguments as 32-bit ints: compare only the
    // low half, or a task could slip past with high bits set.
    let int = |arg: u32, value: u64| {
        ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(0xffff_ffff), value)
    };
    let socket = ScmpSyscall::from_name("socket").map_err(err)?;
    for domain in [libc::AF_INET, libc::AF_INET6] {
        let domain = int(0, domain as u64);
        ctx.add_rule_conditional(
            ScmpAction::Errno(libc::EPROTONOSUPPORT),
            socket,
            &[domain, int(2, IPPROTO_SCTP)],
        )
        .map_err(err)?;
        let seqpacket = ScmpArgCompare::new(
            1,
            ScmpCompareOp::MaskedEqual(0xf),
            libc::SOCK_SEQPACKET as u64,
        );
        ctx.add_rule_conditional(
            ScmpAction::Errno(libc::ESOCKTNOSUPPORT),
            socket,
            &[domain, seqpacket],
        )
        .map_err(err)?;
    }
    for name in DENIED_ENOSYS {
        let sc = ScmpSyscall::from_name(name).map_err(err)?;
        ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), sc)
            .map_err(err)?;
    }
    // libseccomp 2.5 can only export to an fd; a pipe holds the few hundred
    // bytes without blocking.
    let (mut rd, wr) = std::io::pipe().map_err(FilterError::Export)?;
    ctx.export_bpf(&wr).map_err(err)?;
    drop(wr);
    let mut bytes = Vec::new();
    rd.read_to_end(&mut bytes).map_err(FilterError::Export)?;
    decode_program(&bytes).map_err(FilterError::Export)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel would on one syscall.
    fn eval(prog: &[SockFilter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&(nr as i32).to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            match i.code {
                0x20 => acc = u32::from_ne_bytes(data[i.k as usize..][..4].try_into().unwrap()),
                0x54 => acc &= i.k,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match i.code {
                        0x15 => acc == i.k,
                        0x25 => acc > i.k,
                        0x35 => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += if taken { i.jt as usize } else { i.jf as usize };
                }
                0x05 => pc += i.k as usize,
                0x06 => return i.k,
                c => panic!("unexpected BPF opcode {c:#x}"),
            }
            pc += 1;
        }
    }

    const X86_64: u32 = 0xC000_003E;
    const I386: u32 = 0x4000_0003;
    const NOTIFY: u32 = 0x7fc0_0000;
    const ALLOW: u32 = 0x7fff_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;

    #[test]
    fn socket_calls_notify_and_data_path_is_native() {
        let p = build(Routing::Notified).unwrap();
        for nr in [
            libc::SYS_bind,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ] {
            assert_eq!(eval(&p, X86_64, nr, [0; 6]), NOTIFY, "syscall {nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_listen,
        ] {
            assert_eq!(eval(&p, X86_64, nr, [0; 6]), ALLOW, "syscall {nr}");
        }
        assert_eq!(
            eval(&p, X86_64, libc::SYS_sendto, [3, 0, 10, 0, 0, 0]),
            ALLOW
        );
        let fastopen = libc::MSG_FASTOPEN as u64;
        assert_eq!(
            eval(&p, X86_64, libc::SYS_sendto, [3, 0, 10, fastopen, 0, 0]),
            NOTIFY
        );
        assert_eq!(
            eval(&p, X86_64, libc::SYS_sendmsg, [3, 0, fastopen, 0, 0, 0]),
            NOTIFY
        );
    }

    #[test]
    fn kernel_routing_notifies_bind_alone_and_sends_are_native() {
        let p = build(Routing::Kernel).unwrap();
        assert_eq!(eval(&p, X86_64, libc::SYS_bind, [0; 6]), NOTIFY);
        let fastopen = libc::MSG_FASTOPEN as u64;
        for (nr, args) in [
            (libc::SYS_connect, [0; 6]),
            (libc::SYS_getsockname, [0; 6]),
            (libc::SYS_getpeername, [0; 6]),
            (libc::SYS_sendto, [3, 0, 10, fastopen, 0, 0]),
            (libc::SYS_sendmsg, [3, 0, fastopen, 0, 0, 0]),
        ] {
            assert_eq!(eval(&p, X86_64, nr, args), ALLOW, "syscall {nr}");
        }
        let errno_enosys = 0x0005_0000 | libc::ENOSYS as u32;
        assert_eq!(
            eval(&p, X86_64, libc::SYS_io_uring_setup, [0; 6]),
            errno_enosys
        );
    }

    #[test]
    fn sctp_sockets_are_not_supported() {
        let p = build(Routing::Notified).unwrap();
        let errno = |e: i32| 0x0005_0000 | e as u32;
        let inet = libc::AF_INET as u64;
        let inet6 = libc::AF_INET6 as u64;
        let stream = libc::SOCK_STREAM as u64;
        let seqpacket = (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64;
        let socket = libc::SYS_socket;
        assert_eq!(
            eval(&p, X86_64, socket, [inet, stream, 132, 0, 0, 0]),
            errno(libc::EPROTONOSUPPORT)
        );
        assert_eq!(
            eval(&p, X86_64, socket, [1 << 32 | inet6, stream, 132, 0, 0, 0]),
            errno(libc::EPROTONOSUPPORT)
        );
        assert_eq!(
            eval(&p, X86_64, socket, [inet, seqpacket, 0, 0, 0, 0]),
            errno(libc::ESOCKTNOSUPPORT)
        );
        for ok in [
            [inet, stream, 0, 0, 0, 0],
            [inet6, stream, libc::IPPROTO_MPTCP as u64, 0, 0, 0],
            [libc::AF_UNIX as u64, seqpacket, 0, 0, 0, 0],
        ] {
            assert_eq!(eval(&p, X86_64, socket, ok), ALLOW, "{ok:?}");
        }
    }

    #[test]
    fn other_abis_are_killed_and_io_uring_is_enosys() {
        let p = build(Routing::Notified).unwrap();
        assert_eq!(eval(&p, I386, 361 /* i386 bind */, [0; 6]), KILL_PROCESS);
        let x32_bind = 0x4000_0000 | libc::SYS_bind;
        assert_eq!(eval(&p, X86_64, x32_bind, [0; 6]), KILL_PROCESS);
        let errno_enosys = 0x0005_0000 | libc::ENOSYS as u32;
        assert_eq!(
            eval(&p, X86_64, libc::SYS_io_uring_setup, [0; 6]),
            errno_enosys
        );
    }
}
