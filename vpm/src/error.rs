use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VpmError {
    #[error("registry {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("registry {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("registry database {path}")]
    Database {
        path: PathBuf,
        #[source]
        error: rusqlite::Error,
    },
    #[error("instance name `{0}` is already in use by a running instance")]
    NameInUse(String),
}

impl VpmError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> VpmError {
        let path = path.into();
        move |error| VpmError::Io { path, error }
    }
}
