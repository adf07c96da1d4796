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
// SAFETY: three u32 each.
unsafe impl Plain for [CapData; 2] {}
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
        assert_eq!(std::mem::size_of::<[CapData; 2]>(), 24);
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
}
