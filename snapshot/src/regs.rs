//! `user_regs_struct` to and from the image, and the fix-up that makes a
//! thread stopped inside a syscall redo it after restore.

use libc::user_regs_struct;

pub fn to_vec(r: &user_regs_struct) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

pub fn from_slice(v: &[u64]) -> Option<user_regs_struct> {
    let v: &[u64; 27] = v.try_into().ok()?;
    Some(user_regs_struct {
        r15: v[0],
        r14: v[1],
        r13: v[2],
        r12: v[3],
        rbp: v[4],
        rbx: v[5],
        r11: v[6],
        r10: v[7],
        r9: v[8],
        r8: v[9],
        rax: v[10],
        rcx: v[11],
        rdx: v[12],
        rsi: v[13],
        rdi: v[14],
        orig_rax: v[15],
        rip: v[16],
        cs: v[17],
        eflags: v[18],
        rsp: v[19],
        ss: v[20],
        fs_base: v[21],
        gs_base: v[22],
        ds: v[23],
        es: v[24],
        fs: v[25],
        gs: v[26],
    })
}

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
/// Length of the `syscall` instruction.
const SYSCALL_LEN: u64 = 2;

/// A thread frozen inside an interrupted syscall shows `-ERESTART*` in rax.
/// The kernel would restart the call on its way back to user space; a
/// restored thread has no such way back, so the restart is written into its
/// registers: back up over `syscall` with the number in rax. The restart
/// block of `ERESTART_RESTARTBLOCK` (sleeps) does not survive, so such calls
/// return EINTR, which their callers handle.
pub fn restart_interrupted_syscall(r: &mut user_regs_struct) {
    if (r.orig_rax as i64) < 0 {
        return;
    }
    match -(r.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= SYSCALL_LEN;
        }
        ERESTART_RESTARTBLOCK => r.rax = (-libc::EINTR as i64) as u64,
        _ => {}
    }
    r.orig_rax = u64::MAX;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> user_regs_struct {
        from_slice(&(0..27).collect::<Vec<u64>>()).unwrap()
    }

    #[test]
    fn round_trip() {
        let r = regs();
        assert_eq!(to_vec(&r), (0..27).collect::<Vec<u64>>());
        assert!(from_slice(&[0; 26]).is_none());
    }

    #[test]
    fn interrupted_calls_are_redone() {
        let mut r = regs();
        r.orig_rax = 232; // epoll_wait
        r.rax = (-ERESTARTNOHAND) as u64;
        r.rip = 0x1002;
        restart_interrupted_syscall(&mut r);
        assert_eq!((r.rax, r.rip, r.orig_rax), (232, 0x1000, u64::MAX));

        let mut sleep = regs();
        sleep.orig_rax = 230;
        sleep.rax = (-ERESTART_RESTARTBLOCK) as u64;
        sleep.rip = 0x2002;
        restart_interrupted_syscall(&mut sleep);
        assert_eq!(
            (sleep.rax as i64, sleep.rip),
            (-(libc::EINTR as i64), 0x2002)
        );

        let mut done = regs();
        done.orig_rax = 0;
        done.rax = 5;
        done.rip = 0x3000;
        restart_interrupted_syscall(&mut done);
        assert_eq!((done.rax, done.rip), (5, 0x3000));
    }
}
