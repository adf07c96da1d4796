//! The seccomp user-notification machinery the multiplexer rides on: the
//! filter program every supervised task runs under (`filter`), the
//! listener loop that receives and answers notifications (`notify`), calls
//! performed as the notifying task (`astask`) and the workers that take the
//! calls which may block off the receive loop (`pool`). Nothing here knows
//! about ports.

pub(crate) mod astask;
pub mod filter;
pub(crate) mod notify;
pub(crate) mod pool;
