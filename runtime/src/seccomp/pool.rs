//! Workers for notified calls that may block (a blocking connect whose
//! handshake is still under way, a bind waiting for a free port, a
//! negotiation with another host): they must not hold up the receive loop,
//! and a thread per call costs more than the call on loopback.
//!
//! The pool is elastic: a job never waits behind another, because a worker
//! is started whenever the jobs queued outnumber the idle workers; workers
//! idle for a while exit.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

const IDLE_EXIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
}

#[derive(Clone, Default)]
pub struct Pool {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Pool {
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().expect("pool lock");
        st.jobs.push_back(Box::new(job));
        let spawn = st.jobs.len() > st.idle;
        drop(st);
        cv.notify_one();
        if spawn {
            let shared = Arc::clone(&self.shared);
            let started = std::thread::Builder::new()
                .name("notify-worker".into())
                .spawn(move || work(&shared));
            if let Err(e) = started {
                // The queued job still runs on an existing worker once one
                // is free.
                tracing::warn!("could not start a worker thread: {e}");
            }
        }
    }
}

fn work(shared: &(Mutex<State>, Condvar)) {
    let (lock, cv) = shared;
    let mut st = lock.lock().expect("pool lock");
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            job();
            st = lock.lock().expect("pool lock");
            continue;
        }
        st.idle += 1;
        let (guard, timeout) = cv.wait_timeout(st, IDLE_EXIT).expect("pool lock");
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.jobs.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_blocked_job_does_not_hold_up_the_next() {
        let pool = Pool::default();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        pool.run(move || {
            let _ = release_rx.recv();
        });
        let d = done_tx.clone();
        pool.run(move || d.send(2).unwrap());
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(2));
        release_tx.send(()).unwrap();
        for i in 0..100 {
            let d = done_tx.clone();
            pool.run(move || d.send(i).unwrap());
        }
        let mut got: Vec<i32> = (0..100)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}
