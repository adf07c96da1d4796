//! Per-application TOML configuration for appshot.
//!
//! The whole point of this crate is that a malformed file is refused with a
//! message naming the file, the line and column, and the offending field, so
//! an operator can fix it without guessing.
#![forbid(unsafe_code)]

mod clone;
mod error;
mod model;
mod parse;
mod remote;

pub use clone::{
    env_file_text, validate_env_key, validate_hostname, validate_value_key, CloneId, CloneRules,
    Identity, Pattern,
};
pub use error::{ConfigError, NameError, RenderError};
pub use model::{validate_aid, validate_name, AppConfig, PortRange, PortSpec, Protocol, UserSpec};
pub use remote::{Cidr, Peer, SourceRule};

#[cfg(test)]
mod tests;
