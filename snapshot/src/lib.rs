//! Snapshot, restore and templates.
//!
//! Nothing is implemented here yet: `appshot snapshot`, `restore` and `clone`
//! arrive with their own issues. The crate exists so the workspace already has
//! the shape the design describes.
#![forbid(unsafe_code)]
