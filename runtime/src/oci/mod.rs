//! appshot as the seccomp agent of OCI runtimes (runc ≥ 1.1, crun): the
//! runtime loads the container's filter from the profile `appshot
//! oci-profile` prints, connects to the agent's socket
//! (`linux.seccomp.listenerPath`) and hands over the filter's listener with
//! the container's state; the agent serves the container's notified socket
//! calls with the same multiplexer and registry as `appshot run`.

pub mod agent;
pub mod profile;
pub mod state;

/// The annotation that names a container's AID.
pub const AID_ANNOTATION: &str = "appshot.aid";
/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/appshot/oci-agent.sock";
