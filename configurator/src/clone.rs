//! What differs between the clones of one template (the specification's
//! "customized-on-duplication"): rules that render, for each clone, its
//! hostname and the values of its identity file from the clone's number,
//! AID and name. A clone's memory is the template's, so these reach the
//! application only through what it asks the kernel (the hostname of its
//! UTS namespace) or reads (the identity file), never through its
//! environment, which it read before the template was taken.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{NameError, RenderError};

/// The Linux limit on a hostname (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

/// Keys of the identity file that appshot itself writes.
const RESERVED_KEYS: &[&str] = &["aid", "name", "hostname"];

/// A text with placeholders for what tells clones apart: `{n}` or
/// `{number}` (the clone's number, 1 … N), `{aid}` and `{name}`; `{{` and
/// `}}` stand for braces. E.g. `web-{n}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Number,
    Aid,
    Name,
}

/// The clone a pattern is rendered for.
#[derive(Clone, Copy, Debug)]
pub struct CloneId<'a> {
    /// 1 … N, in the order `appshot clone` starts them.
    pub number: u32,
    pub aid: &'a str,
    pub name: &'a str,
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A line of the identity file each: a line break would start a
        // value of its own.
        if s.contains(['\n', '\r', '\0']) {
            return Err(format!(
                "`{}` contains a line break or NUL",
                s.escape_default()
            ));
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!("`{s}`: `{{{name}` is not closed with `}}`"));
                    }
                    let part = match name.as_str() {
                        // `{number}` too: clap's help shows `{n}` as a
                        // line break, so `--help` names the long form.
                        "n" | "number" => Part::Number,
                        "aid" => Part::Aid,
                        "name" => Part::Name,
                        _ => {
                            return Err(format!(
                                "`{s}`: unknown placeholder `{{{name}}}`; use {{n}} (or {{number}}), {{aid}} or {{name}} (and {{{{ }}}} for braces)"
                            ))
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                '}' => {
                    return Err(format!(
                        "`{s}`: a `}}` closes no placeholder (write `}}}}` for a brace)"
                    ))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Pattern {
            source: s.to_string(),
            parts,
        })
    }
}

impl Pattern {
    pub fn render(&self, clone: &CloneId<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Number => out.push_str(&clone.number.to_string()),
                Part::Aid => out.push_str(clone.aid),
                Part::Name => out.push_str(clone.name),
            }
        }
        out
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The config's `[clone]` rules (flags of `appshot clone` override them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloneRules {
    /// Where each clone sees its own identity file.
    pub identity_file: Option<PathBuf>,
    /// Each clone's hostname; `None`: the clone's name.
    pub hostname: Option<Pattern>,
    /// `KEY = pattern`: lines of the identity file after appshot's own.
    pub values: BTreeMap<String, Pattern>,
    /// Where each clone sees its own environment file.
    pub env_file: Option<PathBuf>,
    /// `KEY = pattern`: the lines of the environment file.
    pub env: BTreeMap<String, Pattern>,
}

/// What one clone is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub hostname: String,
    /// Rendered `values`, by key.
    pub values: Vec<(String, String)>,
    /// Rendered `env`, by key.
    pub env: Vec<(String, String)>,
}

impl CloneRules {
    /// The identity of one clone; an error says which rule renders into
    /// something the clone cannot be given.
    pub fn render(&self, clone: &CloneId<'_>) -> Result<Identity, RenderError> {
        let hostname = match &self.hostname {
            Some(p) => p.render(clone),
            None => clone.name.to_string(),
        };
        validate_hostname(&hostname).map_err(|source| RenderError {
            clone: clone.name.to_string(),
            source,
        })?;
        let render = |m: &BTreeMap<String, Pattern>| {
            m.iter()
                .map(|(k, p)| (k.clone(), p.render(clone)))
                .collect()
        };
        Ok(Identity {
            hostname,
            values: render(&self.values),
            env: render(&self.env),
        })
    }
}

/// A hostname as the kernel takes it (at most 64 bytes) and resolvers
/// expect it: letters, digits, '-', '.' and '_' (instance names may hold
/// '_', and a clone's hostname defaults to its name).
pub fn validate_hostname(hostname: &str) -> Result<(), NameError> {
    let what = "hostname";
    if hostname.is_empty() {
        return Err(NameError::Empty { what });
    }
    if let Some(bad) = hostname
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(NameError::Character {
            what,
            value: hostname.into(),
            bad,
            allowed: "letters, digits, '-', '.' and '_'",
        });
    }
    if hostname.len() > HOST_NAME_MAX {
        return Err(NameError::TooLong {
            what,
            value: hostname.into(),
            max: HOST_NAME_MAX,
        });
    }
    Ok(())
}

/// A key of the identity file: an environment-style name
/// (`[A-Za-z_][A-Za-z0-9_]*`), not one of appshot's own (`aid`, `name`,
/// `hostname`).
pub fn validate_value_key(key: &str) -> Result<(), NameError> {
    validate_env_key(key)?;
    if RESERVED_KEYS.contains(&key) {
        return Err(NameError::Reserved(key.into()));
    }
    Ok(())
}

/// A key of the environment file: a shell variable name (which every
/// reader of such files takes).
pub fn validate_env_key(key: &str) -> Result<(), NameError> {
    let mut chars = key.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(NameError::NotVariable(key.into()));
    }
    Ok(())
}

/// The environment file's text: `KEY='VALUE'` a line, single-quoted as
/// POSIX sh reads it (`set -a; . FILE`), a `'` in VALUE written `'\''`.
pub fn env_file_text(env: &[(String, String)]) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', "'\\''")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: CloneId<'static> = CloneId {
        number: 7,
        aid: "shop-7",
        name: "web-7",
    };

    fn render(p: &str) -> String {
        p.parse::<Pattern>().unwrap().render(&ONE)
    }

    #[test]
    fn patterns_render_number_aid_and_name() {
        assert_eq!(render("web-{n}"), "web-7");
        assert_eq!(render("{name}.{aid}.local"), "web-7.shop-7.local");
        assert_eq!(render("db://{aid}/{{x}}"), "db://shop-7/{x}");
        assert_eq!(render("{number}"), "7");
        assert_eq!(render("fixed"), "fixed");
        assert_eq!(render(""), "");
        assert_eq!("web-{n}".parse::<Pattern>().unwrap().to_string(), "web-{n}");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (bad, says) in [
            ("web-{id}", "unknown placeholder `{id}`"),
            ("web-{n", "`{n` is not closed"),
            ("a}b", "closes no placeholder"),
            ("a\nb", "line break"),
        ] {
            let e = bad.parse::<Pattern>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn env_file_lines_are_single_quoted_for_sh() {
        let env = [
            ("A".to_string(), "plain".to_string()),
            ("B".to_string(), "it's $HOME `x`".to_string()),
            ("C".to_string(), String::new()),
        ];
        assert_eq!(
            env_file_text(&env),
            "A='plain'\nB='it'\\''s $HOME `x`'\nC=''\n"
        );
        assert!(validate_env_key("hostname").is_ok());
        assert!(validate_env_key("1A").is_err());
        assert!(validate_env_key("A-B").is_err());
    }

    #[test]
    fn rules_render_hostname_and_values() {
        let rules = CloneRules {
            identity_file: None,
            hostname: Some("h-{n}".parse().unwrap()),
            values: [("SHARD".to_string(), "{n}".parse().unwrap())].into(),
            env_file: None,
            env: [("DB".to_string(), "db-{aid}".parse().unwrap())].into(),
        };
        assert_eq!(
            rules.render(&ONE).unwrap(),
            Identity {
                hostname: "h-7".into(),
                values: vec![("SHARD".into(), "7".into())],
                env: vec![("DB".into(), "db-shop-7".into())],
            }
        );
        // By default the hostname is the clone's name.
        assert_eq!(
            CloneRules::default().render(&ONE).unwrap().hostname,
            "web-7"
        );
        let long = CloneRules {
            hostname: Some(format!("{}-{{n}}", "x".repeat(63)).parse().unwrap()),
            ..CloneRules::default()
        };
        let e = long.render(&ONE).unwrap_err();
        assert_eq!(e.clone, "web-7");
        assert!(
            matches!(e.source, NameError::TooLong { max: 64, .. }),
            "{:?}",
            e.source
        );
    }

    #[test]
    fn hostnames_and_keys() {
        assert!(validate_hostname("web-1.example").is_ok());
        assert!(validate_hostname(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", &"a".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
        for good in ["SHARD", "_x", "db_url2"] {
            assert!(validate_value_key(good).is_ok(), "{good}");
        }
        for bad in ["", "1x", "A-B", "A=B"] {
            assert_eq!(
                validate_value_key(bad),
                Err(NameError::NotVariable(bad.into()))
            );
        }
        for own in ["aid", "name", "hostname"] {
            assert_eq!(
                validate_value_key(own),
                Err(NameError::Reserved(own.into()))
            );
        }
    }
}
