//! Kernel structs that appshot writes into, or reads from, another
//! process's memory as bytes (a restore builds a syscall's arguments in the
//! restored process), as `repr(C)` types rather than byte offsets.

/// A `repr(C)` type made of integers only, with no padding: every byte of
/// a value is initialised, and every byte pattern is a value.
///
/// # Safety
///
/// Implement it only for `repr(C)` (or `repr(C, packed)`) types whose
/// fields are integers or arrays of them, laid out without padding.
pub unsafe trait Plain: Copy + 'static {}

// SAFETY: two u64 fields.
unsafe impl Plain for libc::rlimit {}
// SAFETY: u16, u8, u8, u32: eight bytes, no padding.
unsafe impl Plain for libc::sock_filter {}
// SAFETY: packed on x86_64: u32 events, u64 data.
unsafe impl Plain for libc::epoll_event {}
// SAFETY: two timevals of two i64 each.
unsafe impl Plain for libc::itimerval {}
// SAFETY: u16, six explicit padding bytes, u64.
unsafe impl Plain for TraceeSockFprog {}
// SAFETY: u32 and i32.
unsafe impl Plain for CapHeader {}
// SAFETY: three u32.
unsafe impl Plain for CapData {}
// SAFETY: an array of a `Plain` type: its values lie one after another,
// each a multiple of its alignment long, so there is no padding between
// them either.
unsafe impl<T: Plain, const N: usize> Plain for [T; N] {}
// SAFETY: four u64.
unsafe impl Plain for KernelSigaction {}
// SAFETY: twelve u64 and two u32: 104 bytes, no padding.
unsafe impl Plain for PrctlMmMap {}
// SAFETY: three i32 and 29 more of padding as an i32 array, 128 bytes,
// after a zero-length u64 array that only aligns it.
unsafe impl Plain for libc::siginfo_t {}
// SAFETY: a u16 family and 108 c_char of path: 110 bytes, alignment 2.
unsafe impl Plain for libc::sockaddr_un {}
// SAFETY: two timespecs of two i64 each.
unsafe impl Plain for libc::itimerspec {}
// SAFETY: eleven u64.
unsafe impl Plain for CloneArgs {}
// SAFETY: u64, i32, four explicit padding bytes, u64.
unsafe impl Plain for TraceeStack {}
// SAFETY: u64, three i32, 44 explicit padding bytes.
unsafe impl Plain for TraceeSigevent {}
// SAFETY: integers have no padding.
unsafe impl Plain for i32 {}
// SAFETY: integers have no padding.
unsafe impl Plain for u32 {}
// SAFETY: integers have no padding.
unsafe impl Plain for u64 {}

/// `struct sock_fprog` as it lies in another process: its filter pointer
/// is an address there, and the padding after `len` is explicit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceeSockFprog {
    pub len: u16,
    pub pad: [u8; 6],
    /// Address of the first `sock_filter` in that process.
    pub filter: u64,
}

/// `struct clone_args` of `clone3(2)` (libc defines it for musl only).
/// Its pointers are addresses in the process that calls clone3.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `stack_t` of sigaltstack(2) as it lies in another process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceeStack {
    /// Address of the stack in that process.
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub pad: [u8; 4],
    pub ss_size: u64,
}

/// `struct sigevent` (64 bytes) as it lies in another process: the value,
/// the signal, how to notify, then the union whose first int is the target
/// thread (`SIGEV_THREAD_ID`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceeSigevent {
    pub value: u64,
    pub signo: i32,
    pub notify: i32,
    pub thread_id: i32,
    pub pad: [u8; 44],
}

/// The kernel's `struct sigaction` of the rt_sigaction system call (not
/// libc's, whose mask is 128 bytes): a 64-bit mask, after the restorer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// `struct prctl_mm_map` of `prctl(PR_SET_MM, PR_SET_MM_MAP)`: a process's
/// memory map fields, set at once. `auxv` is an address in the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    /// In bytes.
    pub auxv_size: u32,
    /// `u32::MAX` (-1): the exe link stays.
    pub exe_fd: u32,
}

/// The bytes of a `sockaddr_un` naming `name` (a path, or an abstract
/// name with its leading NUL), as long as the kernel takes it: the family
/// and the name, no terminating NUL added. `None` if `name` does not fit.
pub fn sockaddr_un(name: &[u8]) -> Option<Vec<u8>> {
    let zeroes = [0u8; std::mem::size_of::<libc::sockaddr_un>()];
    let mut addr: libc::sockaddr_un = from_bytes(&zeroes).expect("bytes of its size");
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = addr.sun_path.get_mut(..name.len())?;
    for (to, from) in path.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + name.len();
    Some(bytes_of(&addr)[..len].to_vec())
}

/// `struct __user_cap_header_struct` of capget/capset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapHeader {
    pub version: u32,
    pub pid: i32,
}

/// `struct __user_cap_data_struct`: one 32-bit half of each set
/// (`_LINUX_CAPABILITY_VERSION_3` takes two, low half first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// The bytes of `v`.
pub fn bytes_of<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: `Plain` types have no padding, so all size_of::<T>() bytes
    // behind the reference are initialised, and they live as long as `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The bytes of the values of `v`, one after another.
pub fn bytes_of_slice<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: as for `bytes_of`; a slice has no gaps between its values.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A value of `T` from the first size_of::<T>() bytes of `b`, or `None`
/// when `b` is shorter.
pub fn from_bytes<T: Plain>(b: &[u8]) -> Option<T> {
    let b = b.get(..std::mem::size_of::<T>())?;
    // SAFETY: `b` holds size_of::<T>() readable bytes, any of which form a
    // value of a `Plain` type; the read tolerates any alignment.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(std::mem::size_of::<TraceeSockFprog>(), 16);
        assert_eq!(std::mem::size_of::<libc::sock_fprog>(), 16);
        assert_eq!(std::mem::size_of::<libc::sock_filter>(), 8);
        assert_eq!(std::mem::size_of::<libc::epoll_event>(), 12);
        assert_eq!(std::mem::size_of::<libc::itimerval>(), 32);
        assert_eq!(std::mem::size_of::<CapHeader>(), 8);
        assert_eq!(std::mem::size_of::<CloneArgs>(), 88);
        assert_eq!(std::mem::size_of::<TraceeStack>(), 24);
        assert_eq!(std::mem::size_of::<TraceeSigevent>(), 64);
        assert_eq!(std::mem::size_of::<libc::itimerspec>(), 32);
        assert_eq!(std::mem::size_of::<[CapData; 2]>(), 24);
        assert_eq!(std::mem::size_of::<KernelSigaction>(), 32);
        assert_eq!(std::mem::size_of::<PrctlMmMap>(), 104);
        assert_eq!(std::mem::size_of::<libc::siginfo_t>(), 128);
        assert_eq!(std::mem::size_of::<libc::sockaddr_un>(), 110);
        assert_eq!(std::mem::size_of::<[i32; 2]>(), 8);
    }

    #[test]
    fn a_value_round_trips_through_its_bytes() {
        let limit = libc::rlimit {
            rlim_cur: 7,
            rlim_max: 9,
        };
        let back: libc::rlimit = from_bytes(bytes_of(&limit)).unwrap();
        assert_eq!((back.rlim_cur, back.rlim_max), (7, 9));
        assert!(from_bytes::<libc::rlimit>(&[0; 15]).is_none());
    }

    #[test]
    fn a_siginfo_gives_its_signal_number_from_its_own_field() {
        let mut raw = [0u8; 128];
        raw[..4].copy_from_slice(&10i32.to_ne_bytes());
        let info: libc::siginfo_t = from_bytes(&raw).unwrap();
        assert_eq!(info.si_signo, 10);
        assert!(from_bytes::<libc::siginfo_t>(&raw[..127]).is_none());
    }

    #[test]
    fn a_unix_address_is_its_family_and_name_only() {
        let family = (libc::AF_UNIX as u16).to_ne_bytes();
        assert_eq!(
            sockaddr_un(b"/run/s").unwrap(),
            [&family[..], b"/run/s"].concat()
        );
        // Abstract: the leading NUL is part of the name, and its length
        // tells the kernel where the name ends.
        assert_eq!(
            sockaddr_un(b"\0ab").unwrap(),
            [&family[..], b"\0ab"].concat()
        );
        assert_eq!(sockaddr_un(&[b'x'; 108]).unwrap().len(), 110);
        assert!(sockaddr_un(&[b'x'; 109]).is_none());
    }
}
