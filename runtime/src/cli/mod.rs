//! What only the binary needs beside parsing and printing: detached
//! supervisors started and awaited (`detach`), and `clone --count`'s names
//! and AIDs (`clones`).

pub mod clones;
pub mod detach;
