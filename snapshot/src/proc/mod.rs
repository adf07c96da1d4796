//! Reading a process through /proc.

pub mod parse;
