use std::path::Path;
use std::time::Duration;

use crate::{AppConfig, CloneId, CloneRules, ConfigError, PortRange, PortSpec, Protocol, UserSpec};

const ORIGIN: &str = "/etc/appshot/shop.toml";

fn parse(text: &str) -> Result<AppConfig, ConfigError> {
    AppConfig::parse(text, Path::new(ORIGIN))
}

/// Asserts the error's location and field, and that the message says why.
#[track_caller]
fn assert_invalid(text: &str, want_line: usize, want_field: &str, want_message: &str) {
    let err = parse(text).expect_err("config should be refused");
    let rendered = err.to_string();
    let ConfigError::Invalid {
        path,
        line,
        field,
        message,
        ..
    } = err
    else {
        panic!("expected Invalid, got {rendered}");
    };
    assert_eq!(path, Path::new(ORIGIN), "{rendered}");
    assert_eq!(
        (line, field.as_str()),
        (want_line, want_field),
        "{rendered}"
    );
    assert!(message.contains(want_message), "{rendered}");
    assert!(
        rendered.starts_with(&format!("{ORIGIN}:{want_line}:"))
            && rendered.contains(&format!("`{want_field}`")),
        "{rendered}"
    );
}

#[test]
fn full_file() {
    let config = parse(
        r#"
aid = "shop"
name = "shop-1"
command = ["python3", "-m", "http.server", "9000"]
cwd = "/srv/shop"
env = { FOO = "bar", EMPTY = "" }
allocation_timeout_ms = 500
port_range = "30000-30099"

[[ports]]
port = 9000
protocol = "tcp"

[[ports]]
port = 9001
"#,
    )
    .unwrap();
    assert_eq!(config.aid.as_deref(), Some("shop"));
    assert_eq!(config.name.as_deref(), Some("shop-1"));
    assert_eq!(config.command, ["python3", "-m", "http.server", "9000"]);
    assert_eq!(config.cwd.as_deref(), Some(Path::new("/srv/shop")));
    assert_eq!(config.env.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(config.env.get("EMPTY").map(String::as_str), Some(""));
    assert_eq!(config.allocation_timeout, Duration::from_millis(500));
    assert_eq!(
        config.port_range,
        PortRange {
            start: 30000,
            end: 30099
        }
    );
    let tcp = |port| PortSpec {
        port,
        protocol: Protocol::Tcp,
    };
    assert_eq!(config.ports, [tcp(9000), tcp(9001)]);
}

#[test]
fn defaults() {
    let config = parse("# nothing but a comment\n").unwrap();
    assert_eq!(config, AppConfig::default());
    assert_eq!(config.aid, None);
    assert!(config.command.is_empty() && config.ports.is_empty() && config.env.is_empty());
    assert_eq!(config.allocation_timeout, Duration::from_millis(2000));
    assert_eq!(
        config.port_range,
        PortRange {
            start: 20000,
            end: 29999
        }
    );
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
}

#[test]
fn load_reads_the_file_and_reports_unreadable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.toml");
    std::fs::write(&path, "aid = \"shop\"\n\n[[ports]]\nport = 0\n").unwrap();
    let err = AppConfig::load(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:4:8: field `ports[0].port`: 0 is not a port number between 1 and 65535",
            path.display()
        )
    );

    std::fs::write(&path, "aid = \"shop\"\n").unwrap();
    assert_eq!(AppConfig::load(&path).unwrap().aid.as_deref(), Some("shop"));

    let missing = dir.path().join("missing.toml");
    let err = AppConfig::load(&missing).unwrap_err();
    assert!(
        matches!(err, ConfigError::Read { ref path, .. } if *path == missing),
        "{err}"
    );
}

#[test]
fn load_refuses_what_is_not_a_regular_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = AppConfig::load(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "config {} is a directory, not a regular file",
            dir.path().display()
        )
    );
}

#[test]
fn syntax_errors() {
    assert_invalid(
        "aid = \"shop\"\nname = \"a\" b\n",
        2,
        "name",
        "expected newline",
    );
    assert_invalid(
        "aid = \"shop\"\naid = \"again\"\n",
        2,
        "aid",
        "duplicate key",
    );
    assert_invalid("aid = \"shop\"\n@@@\n", 2, "<document>", "");
    assert_invalid(
        "aid = \"shop\"\n[[ports]\nport = 1\n",
        2,
        "<document>",
        "invalid table header",
    );
    // toml points past the unclosed array; the key is found on the line above.
    assert_invalid("aid = \"shop\"\ncommand = [\"a\",\n", 3, "command", "");
}

#[test]
fn unknown_fields() {
    assert_invalid(
        "aid = \"shop\"\n\ncomand = [\"x\"]\n",
        3,
        "comand",
        "unknown field `comand`",
    );
    assert_invalid(
        "[[ports]]\nport = 1\n\n[[ports]]\nport = 2\nprotocl = \"tcp\"\n",
        6,
        "ports[1].protocl",
        "expected `port` or `protocol`",
    );
}

#[test]
fn wrong_types() {
    assert_invalid(
        "[[ports]]\nport = \"abc\"\n",
        2,
        "ports[0].port",
        "invalid type: string \"abc\"",
    );
    assert_invalid(
        "allocation_timeout_ms = \"2s\"\n",
        1,
        "allocation_timeout_ms",
        "invalid type",
    );
    assert_invalid(
        "command = [\"a\", 3]\n",
        1,
        "command[1]",
        "invalid type: integer `3`",
    );
    assert_invalid(
        "\nenv = { FOO = 1 }\n",
        2,
        "env.FOO",
        "invalid type: integer `1`",
    );
    assert_invalid(
        "[[ports]]\nprotocol = \"tcp\"\n",
        1,
        "ports[0].port",
        "missing field `port`",
    );
}

#[test]
fn out_of_range_values() {
    assert_invalid(
        "[[ports]]\nport = 9000\n[[ports]]\nport = 0\n",
        4,
        "ports[1].port",
        "between 1 and 65535",
    );
    assert_invalid(
        "[[ports]]\nport = 70000\n",
        2,
        "ports[0].port",
        "70000 is not a port number",
    );
    assert_invalid(
        "aid = \"shop\"\nport_range = \"300-200\"\n",
        2,
        "port_range",
        "start 300 is above end 200",
    );
    assert_invalid(
        "port_range = \"abc\"\n",
        1,
        "port_range",
        "must look like START-END",
    );
    assert_invalid(
        "port_range = \"0-100\"\n",
        1,
        "port_range",
        "`0` is not a port number",
    );
    assert_invalid(
        "\nallocation_timeout_ms = 600001\n",
        2,
        "allocation_timeout_ms",
        "expected 0 to 600000",
    );
    assert_invalid(
        "allocation_timeout_ms = -1\n",
        1,
        "allocation_timeout_ms",
        "out of range",
    );
    assert_eq!(
        parse("allocation_timeout_ms = 600000\n")
            .unwrap()
            .allocation_timeout,
        Duration::from_secs(600)
    );
}

#[test]
fn protocols() {
    assert_invalid(
        "[[ports]]\nport = 53\nprotocol = \"udp\"\n",
        3,
        "ports[0].protocol",
        "UDP multiplexing is not supported yet; only tcp",
    );
    assert_invalid(
        "[[ports]]\nport = 53\nprotocol = \"sctp\"\n",
        3,
        "ports[0].protocol",
        "unknown protocol `sctp`",
    );
}

#[test]
fn identifiers() {
    assert_invalid("aid = \"shop/../etc\"\n", 1, "aid", "contains '/'");
    assert_invalid(
        "aid = \"shop\"\nname = \"shop 1\"\n",
        2,
        "name",
        "contains ' '",
    );
    assert_invalid("name = \"..\"\n", 1, "name", "must not be `..`");
    assert_invalid("aid = \"\"\n", 1, "aid", "must not be empty");
}

#[test]
fn command_env_and_cwd_strings() {
    assert_invalid(
        "command = [\n  \"python3\",\n  \"\",\n]\n",
        3,
        "command[1]",
        "must not be empty",
    );
    assert_invalid("command = [\"\"]\n", 1, "command[0]", "must not be empty");
    assert_invalid("command = [\"a\\u0000b\"]\n", 1, "command[0]", "NUL");
    assert_invalid("cwd = \"\"\n", 1, "cwd", "must not be empty");
    assert_invalid(
        "[env]\nOK = \"1\"\n\"A=B\" = \"x\"\n",
        3,
        "env.A=B",
        "neither '=' nor NUL",
    );
}

#[test]
fn duplicate_ports() {
    assert_invalid(
        "[[ports]]\nport = 9000\n\n[[ports]]\nport = 9001\n\n[[ports]]\nport = 9000\nprotocol = \"tcp\"\n",
        8,
        "ports[2].port",
        "port 9000/tcp is already listed in ports[0]",
    );
}

#[test]
fn cross_host_settings() {
    let config = parse(
        r#"
default_aid = "a"
peers = ["10.200.1.1", "[fd00::1]:7000"]
agent_port = 7947
cluster_key_file = "/etc/appshot/cluster.key"
agent_timeout_ms = 250

[[source_rules]]
source = "10.9.0.0/24"
aid = "b"

[[source_rules]]
source = "10.9.0.7"
source_port = 5000
aid = "c"
"#,
    )
    .unwrap();
    assert_eq!(config.default_aid.as_deref(), Some("a"));
    assert_eq!(config.agent_port, Some(7947));
    assert_eq!(config.agent_timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        config.cluster_key_file.as_deref(),
        Some(Path::new("/etc/appshot/cluster.key"))
    );
    assert_eq!(
        config.peers,
        [
            crate::Peer {
                addr: "10.200.1.1".parse().unwrap(),
                agent_port: None
            },
            crate::Peer {
                addr: "fd00::1".parse().unwrap(),
                agent_port: Some(7000)
            }
        ]
    );
    let rules: Vec<(String, Option<u16>, &str)> = config
        .source_rules
        .iter()
        .map(|r| (r.source.to_string(), r.source_port, r.aid.as_str()))
        .collect();
    assert_eq!(
        rules,
        [
            ("10.9.0.0/24".to_string(), None, "b"),
            ("10.9.0.7/32".to_string(), Some(5000), "c")
        ]
    );
    assert!(parse("").unwrap().source_rules.is_empty());
}

#[test]
fn bad_cross_host_settings_name_their_field() {
    assert_invalid(
        "[[source_rules]]\nsource = \"10.9.0.1/24\"\naid = \"b\"\n",
        2,
        "source_rules[0].source",
        "host bits",
    );
    assert_invalid(
        "[[source_rules]]\nsource = \"nowhere\"\naid = \"b\"\n",
        2,
        "source_rules[0].source",
        "not an IP address",
    );
    assert_invalid(
        "[[source_rules]]\nsource = \"10.9.0.0/24\"\nsource_port = 70000\naid = \"b\"\n",
        3,
        "source_rules[0].source_port",
        "70000",
    );
    assert_invalid(
        "[[source_rules]]\nsource = \"10.9.0.0/24\"\naid = \"b/c\"\n",
        3,
        "source_rules[0].aid",
        "'/'",
    );
    assert_invalid(
        "[[source_rules]]\nsource = \"10.9.0.0/24\"\n",
        1,
        "source_rules[0].aid",
        "missing field",
    );
    assert_invalid(
        "[[source_rules]]\nsource = \"10.9.0.0/24\"\naid = \"b\"\n\n[[source_rules]]\nsource = \"10.9.0.0/24\"\naid = \"c\"\n",
        6,
        "source_rules[1].source",
        "already routed by source_rules[0]",
    );
    assert_invalid("default_aid = \"\"\n", 1, "default_aid", "empty");
    assert_invalid("peers = [\"10.200.1.1:0\"]\n", 1, "peers[0]", "port 0");
    assert_invalid("peers = [\"hostname\"]\n", 1, "peers[0]", "ADDRESS");
    assert_invalid("agent_port = 0\n", 1, "agent_port", "between 1 and 65535");
    assert_invalid(
        "agent_timeout_ms = 0\n",
        1,
        "agent_timeout_ms",
        "out of range",
    );
    assert_invalid(
        "agent_timeout_ms = 60000\n",
        1,
        "agent_timeout_ms",
        "1 to 10000",
    );
    assert_invalid("cluster_key_file = \"\"\n", 1, "cluster_key_file", "empty");
}

#[test]
fn clone_rules() {
    let c = parse(
        "aid = \"a\"\n[clone]\nidentity_file = \"/srv/www/whoami.txt\"\nhostname = \"shop-{n}\"\n\
         env_file = \"/run/clone.env\"\n\
         [clone.values]\nSHARD = \"{n}\"\nDB_URL = \"postgres://db/{aid}\"\n\
         [clone.env]\nREPLICA = \"r{n}\"\n",
    )
    .unwrap();
    assert_eq!(
        c.clone.env_file.as_deref(),
        Some(Path::new("/run/clone.env"))
    );
    assert_eq!(
        c.clone.identity_file.as_deref(),
        Some(Path::new("/srv/www/whoami.txt"))
    );
    let id = c
        .clone
        .render(&CloneId {
            number: 2,
            aid: "a-2",
            name: "s-2",
        })
        .unwrap();
    assert_eq!(id.hostname, "shop-2");
    assert_eq!(
        id.values,
        [
            ("DB_URL".to_string(), "postgres://db/a-2".to_string()),
            ("SHARD".to_string(), "2".to_string())
        ]
    );
    assert_eq!(id.env, [("REPLICA".to_string(), "r2".to_string())]);
    assert_eq!(parse("aid = \"a\"\n").unwrap().clone, CloneRules::default());
    assert_invalid(
        "aid = \"a\"\n[clone]\nenv_file = \"x.env\"\n",
        3,
        "clone.env_file",
        "absolute path",
    );
    assert_invalid(
        "[clone.env]\nA-B = \"x\"\n",
        2,
        "clone.env.A-B",
        "not a variable name",
    );
    assert_invalid(
        "aid = \"a\"\n[clone]\nidentity_file = \"whoami.txt\"\n",
        3,
        "clone.identity_file",
        "absolute path",
    );
    assert_invalid(
        "[clone]\nidentity = \"/x\"\n",
        2,
        "clone.identity",
        "unknown field",
    );
    assert_invalid(
        "[clone]\nhostname = \"web-{id}\"\n",
        2,
        "clone.hostname",
        "unknown placeholder `{id}`",
    );
    assert_invalid(
        "[clone]\nhostname = \"web {n}\"\n",
        2,
        "clone.hostname",
        "' '",
    );
    assert_invalid(
        "[clone.values]\nhostname = \"x\"\n",
        2,
        "clone.values.hostname",
        "written by appshot",
    );
    assert_invalid(
        "[clone.values]\nA-B = \"x\"\n",
        2,
        "clone.values.A-B",
        "not a variable name",
    );
    assert_invalid(
        "[clone.values]\nX = \"a\\nb\"\n",
        2,
        "clone.values.X",
        "line break",
    );
}

#[test]
fn user_is_a_name_or_number_with_an_optional_group() {
    let c = parse("user = \"redis\"\n").unwrap();
    assert_eq!(
        c.user,
        Some(UserSpec {
            user: "redis".into(),
            group: None
        })
    );
    let c = parse("user = \"1000:www-data\"\n").unwrap();
    assert_eq!(c.user.unwrap().to_string(), "1000:www-data");
    assert_eq!(parse("aid = \"a\"\n").unwrap().user, None);
    assert_invalid("user = \"\"\n", 1, "user", "name or number");
    assert_invalid("user = \"a:b:c\"\n", 1, "user", "group");
    assert_invalid("aid = \"a\"\nuser = \"redis:\"\n", 2, "user", "group");
    assert_invalid("user = 1000\n", 1, "user", "expected a string");
}
