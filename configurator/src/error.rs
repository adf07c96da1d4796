use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config {path} is {what}, not a regular file")]
    NotRegularFile { path: PathBuf, what: &'static str },
    #[error("{path}:{line}:{column}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
}

/// Why an identifier (an AID, an instance name, a hostname, a key of a
/// clone's identity file) is refused; `what` names which it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} `{value}` contains {bad:?}; only {allowed} are allowed")]
    Character {
        what: &'static str,
        value: String,
        bad: char,
        allowed: &'static str,
    },
    #[error("{what} `{value}` is {} characters long; at most {max} are allowed", value.len())]
    TooLong {
        what: &'static str,
        value: String,
        max: usize,
    },
    /// `.` and `..`: allowed characters, but they would escape or alias
    /// the directory the identifier names.
    #[error("{what} must not be `{value}`")]
    Dots { what: &'static str, value: String },
    #[error("`{0}` is not a variable name (a letter or '_', then letters, digits or '_')")]
    NotVariable(String),
    #[error("`{0}` is written by appshot itself")]
    Reserved(String),
}

/// A clone's identity cannot be rendered from its template's rules.
#[derive(Debug, thiserror::Error)]
#[error("clone {clone}")]
pub struct RenderError {
    pub clone: String,
    #[source]
    pub source: NameError,
}

impl ConfigError {
    /// Builds an `Invalid` error pointing at the start of `span` in `text`.
    /// Without a span (toml gives none for some whole-document errors) the
    /// error points at the top of the file rather than pretending to know more.
    pub(crate) fn invalid(
        origin: &Path,
        text: &str,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = span.map_or((1, 1), |s| line_column(text, s.start));
        ConfigError::Invalid {
            path: origin.to_path_buf(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters, as editors count) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// toml reports end-of-input errors at `text.len()` and we never want a
/// slice to panic on a span that lands inside a multi-byte character.
fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_column_is_one_based_and_counts_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('=').unwrap()), (1, 3));
        assert_eq!(line_column(text, text.rfind('=').unwrap()), (2, 4));
        assert_eq!(line_column(text, text.len()), (3, 1));
    }
}
