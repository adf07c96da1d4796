//! Deserialization into a span-carrying mirror of the file, then validation
//! into [`AppConfig`]. Keeping the raw structs private lets every field keep
//! its `Spanned` position without leaking that into the public model.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_path_to_error::Segment;
use toml::Spanned;

use crate::clone::{
    validate_env_key, validate_hostname, validate_value_key, CloneId, CloneRules, Pattern,
};
use crate::error::{ConfigError, NameError};
use crate::model::{
    validate_aid, validate_name, AppConfig, PortRange, PortSpec, Protocol, UserSpec,
};
use crate::remote::{Cidr, Peer, SourceRule};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    aid: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    #[serde(default)]
    command: Vec<Spanned<String>>,
    cwd: Option<Spanned<String>>,
    // Keys stay plain strings: a `Spanned` key hides the key from
    // serde_path_to_error, and the value's span is on the same line anyway.
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    // Signed so a negative value gets our range message, not a serde type error.
    allocation_timeout_ms: Option<Spanned<i64>>,
    port_range: Option<Spanned<String>>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    source_rules: Vec<RawSourceRule>,
    default_aid: Option<Spanned<String>>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    agent_port: Option<Spanned<i64>>,
    cluster_key_file: Option<Spanned<String>>,
    agent_timeout_ms: Option<Spanned<i64>>,
    clone: Option<RawClone>,
    user: Option<Spanned<String>>,
    executable: Option<Spanned<String>>,
}

/// What must differ between clones of a template (the specification's
/// non-sharable data).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClone {
    identity_file: Option<Spanned<String>>,
    hostname: Option<Spanned<String>>,
    // Keys stay plain strings, as for `env`.
    #[serde(default)]
    values: BTreeMap<String, Spanned<String>>,
    env_file: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSourceRule {
    source: Spanned<String>,
    source_port: Option<Spanned<i64>>,
    aid: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    // Wider than u16 so 0 and 70000 share one clear range message.
    port: Spanned<i64>,
    protocol: Option<Spanned<String>>,
}

/// The file being parsed, for turning spans into located errors.
struct Source<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Source<'_> {
    fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::invalid(self.origin, self.text, Some(span), field, message)
    }

    fn port(&self, value: &Spanned<i64>, field: &str) -> Result<u16, ConfigError> {
        match u16::try_from(*value.get_ref()) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(self.invalid(
                value.span(),
                field,
                format!(
                    "{} is not a port number between 1 and 65535",
                    value.get_ref()
                ),
            )),
        }
    }

    /// A string that ends up in argv, environ or a path, where NUL cannot be
    /// represented and would only fail later, far from the config file.
    fn c_string(
        &self,
        value: Spanned<String>,
        field: &str,
        allow_empty: bool,
    ) -> Result<String, ConfigError> {
        if !allow_empty && value.get_ref().is_empty() {
            return Err(self.invalid(value.span(), field, "must not be empty"));
        }
        if value.get_ref().contains('\0') {
            return Err(self.invalid(value.span(), field, "must not contain a NUL character"));
        }
        Ok(value.into_inner())
    }
}

pub(crate) fn parse(text: &str, origin: &Path) -> Result<AppConfig, ConfigError> {
    let src = Source { text, origin };
    let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|err| deserialize_error(&src, err))?;
    raw.validate(&src)
}

impl RawConfig {
    fn validate(self, src: &Source<'_>) -> Result<AppConfig, ConfigError> {
        let defaults = AppConfig::default();
        let identifier = |value: Option<Spanned<String>>,
                          field: &str,
                          check: fn(&str) -> Result<(), NameError>| {
            value
                .map(|v| match check(v.get_ref()) {
                    Ok(()) => Ok(v.into_inner()),
                    Err(e) => Err(src.invalid(v.span(), field, e.to_string())),
                })
                .transpose()
        };
        let aid = identifier(self.aid, "aid", validate_aid)?;
        let name = identifier(self.name, "name", validate_name)?;

        let command = self
            .command
            .into_iter()
            .enumerate()
            .map(|(i, arg)| src.c_string(arg, &format!("command[{i}]"), false))
            .collect::<Result<_, _>>()?;

        let env = self
            .env
            .into_iter()
            .map(|(key, value)| {
                let field = format!("env.{key}");
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(src.invalid(
                        value.span(),
                        field,
                        "environment variable names must be non-empty and contain neither '=' nor NUL",
                    ));
                }
                Ok((key, src.c_string(value, &field, true)?))
            })
            .collect::<Result<_, _>>()?;

        let allocation_timeout = match self.allocation_timeout_ms {
            None => defaults.allocation_timeout,
            Some(ms) => match u64::try_from(*ms.get_ref()) {
                Ok(v) if v <= AppConfig::MAX_ALLOCATION_TIMEOUT_MS => Duration::from_millis(v),
                _ => {
                    return Err(src.invalid(
                        ms.span(),
                        "allocation_timeout_ms",
                        format!(
                            "{} is out of range; expected 0 to {} milliseconds",
                            ms.get_ref(),
                            AppConfig::MAX_ALLOCATION_TIMEOUT_MS
                        ),
                    ))
                }
            },
        };

        let port_range = match self.port_range {
            None => defaults.port_range,
            Some(range) => range
                .get_ref()
                .parse::<PortRange>()
                .map_err(|message| src.invalid(range.span(), "port_range", message))?,
        };

        let mut ports: Vec<PortSpec> = Vec::with_capacity(self.ports.len());
        for (i, raw) in self.ports.into_iter().enumerate() {
            let spec = raw.validate(src, i)?;
            if let Some(first) = ports.iter().position(|p| *p == spec) {
                return Err(src.invalid(
                    raw.port.span(),
                    format!("ports[{i}].port"),
                    format!(
                        "port {}/{} is already listed in ports[{first}]",
                        spec.port, spec.protocol
                    ),
                ));
            }
            ports.push(spec);
        }

        let mut source_rules: Vec<SourceRule> = Vec::with_capacity(self.source_rules.len());
        for (i, raw) in self.source_rules.into_iter().enumerate() {
            let rule = raw.validate(src, i)?;
            if let Some(first) = source_rules
                .iter()
                .position(|r| r.source == rule.source && r.source_port == rule.source_port)
            {
                return Err(src.invalid(
                    raw.source.span(),
                    format!("source_rules[{i}].source"),
                    format!(
                        "source {}{} is already routed by source_rules[{first}]",
                        rule.source,
                        rule.source_port
                            .map(|p| format!(" port {p}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            source_rules.push(rule);
        }
        let default_aid = identifier(self.default_aid, "default_aid", validate_aid)?;
        let peers = self
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.get_ref()
                    .parse::<Peer>()
                    .map_err(|message| src.invalid(p.span(), format!("peers[{i}]"), message))
            })
            .collect::<Result<_, _>>()?;
        let agent_port = self
            .agent_port
            .map(|p| src.port(&p, "agent_port"))
            .transpose()?;
        let agent_timeout = match self.agent_timeout_ms {
            None => None,
            Some(ms) => match u64::try_from(*ms.get_ref()) {
                Ok(v) if (1..=AppConfig::MAX_AGENT_TIMEOUT_MS).contains(&v) => {
                    Some(Duration::from_millis(v))
                }
                _ => {
                    return Err(src.invalid(
                        ms.span(),
                        "agent_timeout_ms",
                        format!(
                            "{} is out of range; expected 1 to {} milliseconds",
                            ms.get_ref(),
                            AppConfig::MAX_AGENT_TIMEOUT_MS
                        ),
                    ))
                }
            },
        };
        let cluster_key_file = self
            .cluster_key_file
            .map(|f| {
                src.c_string(f, "cluster_key_file", false)
                    .map(PathBuf::from)
            })
            .transpose()?;

        let clone = self
            .clone
            .map(|c| c.validate(src))
            .transpose()?
            .unwrap_or_default();

        let user = self
            .user
            .map(|u| {
                let span = u.span();
                u.get_ref()
                    .parse::<UserSpec>()
                    .map_err(|e| src.invalid(span, "user", e))
            })
            .transpose()?;

        let executable = self
            .executable
            .map(|f| {
                let span = f.span();
                let path = PathBuf::from(src.c_string(f, "executable", false)?);
                if !path.is_absolute() {
                    return Err(src.invalid(
                        span,
                        "executable",
                        "must be an absolute path (the program this config applies to)",
                    ));
                }
                Ok(path)
            })
            .transpose()?;

        Ok(AppConfig {
            executable,
            user,
            clone,
            source_rules,
            default_aid,
            peers,
            agent_port,
            cluster_key_file,
            agent_timeout,
            aid,
            name,
            command,
            cwd: self
                .cwd
                .map(|cwd| src.c_string(cwd, "cwd", false).map(PathBuf::from))
                .transpose()?,
            env,
            allocation_timeout,
            port_range,
            ports,
        })
    }
}

impl RawClone {
    fn validate(self, src: &Source<'_>) -> Result<CloneRules, ConfigError> {
        let absolute = |f: Spanned<String>, field: &str| {
            let span = f.span();
            let path = PathBuf::from(src.c_string(f, field, false)?);
            if !path.is_absolute() {
                return Err(src.invalid(
                    span,
                    field,
                    "must be an absolute path (it names a file inside every clone)",
                ));
            }
            Ok(path)
        };
        let identity_file = self
            .identity_file
            .map(|f| absolute(f, "clone.identity_file"))
            .transpose()?;
        let env_file = self
            .env_file
            .map(|f| absolute(f, "clone.env_file"))
            .transpose()?;
        let pattern = |value: &Spanned<String>, field: &str| {
            value
                .get_ref()
                .parse::<Pattern>()
                .map_err(|message| src.invalid(value.span(), field, message))
        };
        let hostname = self
            .hostname
            .map(|h| {
                let p = pattern(&h, "clone.hostname")?;
                // Rendered for the shortest clone there can be: what it
                // refuses, every clone would.
                let sample = p.render(&CloneId {
                    number: 1,
                    aid: "a",
                    name: "a",
                });
                validate_hostname(&sample)
                    .map_err(|e| src.invalid(h.span(), "clone.hostname", e.to_string()))?;
                Ok(p)
            })
            .transpose()?;
        let values = self
            .values
            .into_iter()
            .map(|(key, value)| {
                let field = format!("clone.values.{key}");
                validate_value_key(&key)
                    .map_err(|e| src.invalid(value.span(), &field, e.to_string()))?;
                Ok((key, pattern(&value, &field)?))
            })
            .collect::<Result<_, _>>()?;
        let env = self
            .env
            .into_iter()
            .map(|(key, value)| {
                let field = format!("clone.env.{key}");
                validate_env_key(&key)
                    .map_err(|e| src.invalid(value.span(), &field, e.to_string()))?;
                Ok((key, pattern(&value, &field)?))
            })
            .collect::<Result<_, _>>()?;
        Ok(CloneRules {
            identity_file,
            hostname,
            values,
            env_file,
            env,
        })
    }
}

impl RawSourceRule {
    fn validate(&self, src: &Source<'_>, index: usize) -> Result<SourceRule, ConfigError> {
        let source = self.source.get_ref().parse::<Cidr>().map_err(|message| {
            src.invalid(
                self.source.span(),
                format!("source_rules[{index}].source"),
                message,
            )
        })?;
        let source_port = self
            .source_port
            .as_ref()
            .map(|p| src.port(p, &format!("source_rules[{index}].source_port")))
            .transpose()?;
        validate_aid(self.aid.get_ref()).map_err(|e| {
            src.invalid(
                self.aid.span(),
                format!("source_rules[{index}].aid"),
                e.to_string(),
            )
        })?;
        Ok(SourceRule {
            source,
            source_port,
            aid: self.aid.get_ref().clone(),
        })
    }
}

impl RawPort {
    fn validate(&self, src: &Source<'_>, index: usize) -> Result<PortSpec, ConfigError> {
        let port = match u16::try_from(*self.port.get_ref()) {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(src.invalid(
                    self.port.span(),
                    format!("ports[{index}].port"),
                    format!(
                        "{} is not a port number between 1 and 65535",
                        self.port.get_ref()
                    ),
                ))
            }
        };
        let protocol = match &self.protocol {
            None => Protocol::Tcp,
            Some(p) => match p.get_ref().to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                other => {
                    let message = if other == "udp" {
                        "UDP multiplexing is not supported yet; only tcp".to_owned()
                    } else {
                        format!("unknown protocol `{}`; only tcp is supported", p.get_ref())
                    };
                    return Err(src.invalid(p.span(), format!("ports[{index}].protocol"), message));
                }
            },
        };
        Ok(PortSpec { port, protocol })
    }
}

fn deserialize_error(
    src: &Source<'_>,
    err: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigError {
    let mut field = field_path(err.path());
    let inner = err.inner();
    let span = inner.span();
    // serde reports a missing field at the enclosing table; naming the field
    // itself tells the reader what to add.
    if let Some(missing) = inner
        .message()
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
    {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(missing);
    }
    if field.is_empty() {
        // Syntax errors happen before any field is visited.
        field = span
            .as_ref()
            .and_then(|s| nearest_key(src.text, s.start))
            .unwrap_or_else(|| "<document>".to_owned());
    }
    // toml splits some messages over lines and leaves a few empty; ours must
    // stay on one line after the location prefix.
    let message = match inner.message().trim() {
        "" => "invalid TOML syntax".to_owned(),
        m => m.replace('\n', "; "),
    };
    ConfigError::invalid(src.origin, src.text, span, field, message)
}

/// Renders a path as it would be written in the file, e.g. `ports[1].protocol`.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            // `Spanned<T>` is deserialized as a map with private keys; they
            // are an implementation detail, not something the user wrote.
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(name);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Best-effort key for a syntax error: the `key = ...` on the error's line or,
/// when toml points past the end of a construct (e.g. an unclosed array at
/// end of file), on the closest preceding line with content.
fn nearest_key(text: &str, offset: usize) -> Option<String> {
    let line_end = text
        .get(offset..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let line = text[..line_end]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let key = line.split_once('=')?.0.trim().trim_matches(['"', '\'']);
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}
