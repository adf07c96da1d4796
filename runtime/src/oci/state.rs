//! What a runtime sends the agent: one message whose bytes are the JSON
//! `ContainerProcessState` of the OCI runtime spec and whose SCM_RIGHTS
//! fds are named, in order, by its `fds` array (`seccompFd` for the
//! listener).

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use oci_spec::runtime::{ContainerProcessState, SECCOMP_FD_NAME};

use super::AID_ANNOTATION;
use crate::error::RuntimeError;

/// One container handed to the agent.
#[derive(Debug)]
pub struct Handoff {
    /// The container id: the instance's name.
    pub id: String,
    pub aid: String,
    /// The container's init, as the runtime (and the agent, in the host's
    /// PID namespace) sees it.
    pub pid: u32,
    pub bundle: PathBuf,
    pub listener: OwnedFd,
}

fn refused(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Oci(reason.into())
}

/// The AID in the listener metadata: `appshot.aid=A`, `aid=A`, or the bare
/// AID.
fn aid_from_metadata(metadata: &str) -> Option<String> {
    let m = metadata.trim();
    let aid = m
        .strip_prefix("appshot.aid=")
        .or_else(|| m.strip_prefix("aid="))
        .unwrap_or(m);
    (!aid.is_empty()).then(|| aid.to_owned())
}

/// Whether the JSON in `bytes` is complete (a runtime's message may
/// arrive in more than one read on a stream socket).
pub fn is_complete(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(_) => true,
        Err(e) => !e.is_eof(),
    }
}

/// Reads the state and takes the listener out of `fds`. The AID comes
/// from the annotation `appshot.aid`, else from the listener metadata;
/// a container with neither is refused, as are names and AIDs that are not
/// safe identifiers.
pub fn parse(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Handoff, RuntimeError> {
    let cps: ContainerProcessState = serde_json::from_slice(bytes)
        .map_err(|e| refused(format!("container process state: {e}")))?;
    let state = cps.state();
    let id = state.id().clone();
    appshot_configurator::validate_name(&id)
        .map_err(|e| refused(format!("container id `{id}`: {e}")))?;
    let annotated = state
        .annotations()
        .as_ref()
        .and_then(|a| a.get(AID_ANNOTATION))
        .cloned();
    let aid = annotated
        .or_else(|| cps.metadata().as_deref().and_then(aid_from_metadata))
        .ok_or_else(|| {
            refused(format!(
                "container `{id}`: no AID (annotation `{AID_ANNOTATION}` or listenerMetadata)"
            ))
        })?;
    appshot_configurator::validate_aid(&aid)
        .map_err(|e| refused(format!("container `{id}`: {e}")))?;
    let pid = state
        .pid()
        .filter(|&p| p > 0)
        .or(Some(*cps.pid()).filter(|&p| p > 0))
        .ok_or_else(|| refused(format!("container `{id}`: no pid in its state")))?;
    if cps.fds().len() != fds.len() {
        return Err(refused(format!(
            "container `{id}`: {} fds named, {} received",
            cps.fds().len(),
            fds.len()
        )));
    }
    let at = cps
        .fds()
        .iter()
        .position(|n| n == SECCOMP_FD_NAME)
        .ok_or_else(|| {
            refused(format!(
                "container `{id}`: no `{SECCOMP_FD_NAME}` among the fds"
            ))
        })?;
    let listener = fds
        .into_iter()
        .nth(at)
        .expect("as many fds as names, checked above");
    Ok(Handoff {
        id,
        aid,
        pid: pid as u32,
        bundle: state.bundle().clone(),
        listener,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What runc 1.1 sends (libcontainer's `ContainerProcessState`).
    fn runc_message(annotations: &str, metadata: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2-dev","fds":["seccompFd"],"pid":4242,"metadata":"{metadata}",
            "state":{{"ociVersion":"1.0.2-dev","id":"web-a","status":"creating","pid":4242,
            "bundle":"/srv/bundles/web-a","annotations":{{{annotations}}}}}}}"#
        )
    }

    fn null_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn the_annotation_names_the_aid_and_the_id_the_instance() {
        let msg = runc_message(r#""appshot.aid":"a""#, "aid=zzz");
        let h = parse(msg.as_bytes(), vec![null_fd()]).unwrap();
        assert_eq!((h.id.as_str(), h.aid.as_str(), h.pid), ("web-a", "a", 4242));
        assert_eq!(h.bundle, PathBuf::from("/srv/bundles/web-a"));
    }

    #[test]
    fn the_metadata_names_the_aid_without_an_annotation() {
        for (metadata, aid) in [("appshot.aid=b", "b"), ("aid=c", "c"), ("d", "d")] {
            let msg = runc_message("", metadata);
            assert_eq!(parse(msg.as_bytes(), vec![null_fd()]).unwrap().aid, aid);
        }
    }

    #[test]
    fn refusals_say_why() {
        let err =
            |msg: String, fds: Vec<OwnedFd>| parse(msg.as_bytes(), fds).unwrap_err().to_string();
        assert!(err(runc_message("", ""), vec![null_fd()]).contains("no AID"));
        assert!(err(runc_message(r#""appshot.aid":"a/b""#, ""), vec![null_fd()]).contains("a/b"));
        assert!(err(runc_message(r#""appshot.aid":"a""#, ""), vec![])
            .contains("1 fds named, 0 received"));
        assert!(!is_complete(br#"{"fds":["seccompFd"],"#));
        assert!(is_complete(runc_message("", "").as_bytes()));
    }
}
