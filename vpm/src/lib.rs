//! Virtual port multiplexer: the table of translations between the fixed
//! ("virtual") ports apps believe they use and the real ports they bind,
//! the routing and allocation rules over it, and the host-wide registry that
//! independent supervisor processes share.
#![forbid(unsafe_code)]

mod address;
pub mod allocator;
pub mod error;
pub mod registry;
pub mod remote;
pub mod routing;
pub mod translation;

pub use allocator::PortRange;
pub use error::VpmError;
pub use registry::{
    is_alive, set_reclaim_hook, set_tcp_change_hook, set_udp_change_hook, CachedRegistry,
    InstanceLock, PendingRecord, Registry,
};
pub use routing::{Group, Route};
pub use translation::{InstanceRecord, Protocol, RegistryState, SourceRuleRecord, Translation};
