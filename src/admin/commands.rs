//! Console text -> `Command`. PgBouncer-style: case-insensitive keywords, an optional
//! trailing semicolon, identifiers optionally double-quoted. Pure, unit-tested.

/// One console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Reload,
    /// None: every shard.
    Pause(Option<String>),
    Resume(Option<String>),
    Promote {
        shard: String,
        node: Option<String>,
    },
    /// `RESHARD CANCEL`: undo the running reshard job (before its cutover).
    ReshardCancel,
    /// `SET ...` (drivers and GUI tools send some at connect): accepted and ignored.
    Set,
    Help,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Shards,
    Nodes,
    Lag,
    Pools,
    Clients,
    Map,
    Reshard,
    Help,
}

impl Show {
    pub const ALL: [(&'static str, Show); 7] = [
        ("SHARDS", Show::Shards),
        ("NODES", Show::Nodes),
        ("LAG", Show::Lag),
        ("POOLS", Show::Pools),
        ("CLIENTS", Show::Clients),
        ("MAP", Show::Map),
        ("RESHARD", Show::Reshard),
    ];
}

/// Every command with its arguments, one per line, for `SHOW HELP` and errors.
pub const USAGE: [(&str, &str); 13] = [
    (
        "SHOW SHARDS",
        "one row per shard: primary, replicas, health, pause",
    ),
    (
        "SHOW NODES",
        "one row per node: role, health, lag, connections, exclusion",
    ),
    (
        "SHOW LAG",
        "one row per replica: lag and why it gets reads or not; then route counts by reason",
    ),
    (
        "SHOW POOLS",
        "one row per server pool (node, user, database)",
    ),
    ("SHOW CLIENTS", "one row per client connection"),
    ("SHOW MAP", "the shard map in use and the last reload"),
    (
        "SHOW RESHARD",
        "the running (or last) reshard job: phase, progress, lag, cutover pause, verification",
    ),
    ("SHOW HELP", "this list"),
    ("RELOAD", "read the shard map file again and apply it"),
    (
        "PAUSE [shard]",
        "hold new transactions (of one shard, or all)",
    ),
    ("RESUME [shard]", "let held transactions go"),
    (
        "PROMOTE <shard> [<node address>]",
        "promote a replica of the shard",
    ),
    (
        "RESHARD CANCEL",
        "undo the running reshard job (before its cutover): both sides as they were",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command \"{0}\"; the console knows: {known}", known = known())]
    Unknown(String),
    #[error("{0}; usage: {1}")]
    Usage(String, &'static str),
}

impl ParseError {
    pub fn sqlstate(&self) -> &'static str {
        "42601"
    }
}

fn known() -> String {
    USAGE.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
}

/// Parses one statement (no semicolons inside). Empty text is not a command: the
/// caller answers it with EmptyQueryResponse.
pub fn parse(text: &str) -> Result<Command, ParseError> {
    let words = split_words(text.trim().trim_end_matches(';'));
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    let unknown = || ParseError::Unknown(text.trim().to_owned());
    match upper.as_slice() {
        ["SHOW", what] => Show::ALL
            .iter()
            .find(|(name, _)| name == what)
            .map(|(_, s)| Command::Show(*s))
            .or_else(|| (*what == "HELP").then_some(Command::Show(Show::Help)))
            .ok_or_else(unknown),
        ["HELP"] => Ok(Command::Help),
        ["SET", ..] => Ok(Command::Set),
        ["RELOAD"] => Ok(Command::Reload),
        ["RELOAD", ..] => Err(usage("RELOAD takes no argument", "RELOAD")),
        ["PAUSE"] => Ok(Command::Pause(None)),
        ["PAUSE", _] => Ok(Command::Pause(Some(unquote(&words[1])))),
        ["RESUME"] => Ok(Command::Resume(None)),
        ["RESUME", _] => Ok(Command::Resume(Some(unquote(&words[1])))),
        ["PAUSE", ..] | ["RESUME", ..] => Err(usage(
            "PAUSE and RESUME take at most one shard",
            "PAUSE [shard] / RESUME [shard]",
        )),
        ["PROMOTE", _] => Ok(Command::Promote {
            shard: unquote(&words[1]),
            node: None,
        }),
        ["PROMOTE", _, _] => Ok(Command::Promote {
            shard: unquote(&words[1]),
            node: Some(unquote(&words[2])),
        }),
        ["PROMOTE", ..] => Err(usage(
            "PROMOTE names a shard and optionally a node",
            "PROMOTE <shard> [<node address>]",
        )),
        ["RESHARD", "CANCEL"] => Ok(Command::ReshardCancel),
        ["RESHARD", ..] => Err(usage(
            "a reshard starts with an edit of the shard map and RELOAD",
            "RESHARD CANCEL",
        )),
        _ => Err(unknown()),
    }
}

fn usage(what: &str, usage: &'static str) -> ParseError {
    ParseError::Usage(what.to_owned(), usage)
}

/// Splits on whitespace, keeping a double-quoted word (with `""` inside) whole.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                current.push_str("\"\"");
                chars.next();
            }
            '"' => {
                quoted = !quoted;
                current.push('"');
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// `"My Shard"` -> `My Shard`; a bare word is kept as written (shard names in the map
/// are case-sensitive).
fn unquote(word: &str) -> String {
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => word.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_commands() {
        assert_eq!(parse("show shards"), Ok(Command::Show(Show::Shards)));
        assert_eq!(parse("  SHOW\tNODES ;"), Ok(Command::Show(Show::Nodes)));
        assert_eq!(parse("Show Lag;"), Ok(Command::Show(Show::Lag)));
        assert_eq!(parse("SHOW HELP"), Ok(Command::Show(Show::Help)));
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(parse("pause s0"), Ok(Command::Pause(Some("s0".into()))));
        assert_eq!(
            parse("RESUME \"My \"\"Shard\"\"\""),
            Ok(Command::Resume(Some("My \"Shard\"".into())))
        );
        assert_eq!(
            parse("PROMOTE s1 10.0.0.2:5432"),
            Ok(Command::Promote {
                shard: "s1".into(),
                node: Some("10.0.0.2:5432".into())
            })
        );
        assert_eq!(
            parse("PROMOTE s1"),
            Ok(Command::Promote {
                shard: "s1".into(),
                node: None
            })
        );
        assert_eq!(parse("SET application_name = 'x'"), Ok(Command::Set));
    }

    #[test]
    fn unknown_commands_list_what_exists() {
        let err = parse("SHOW DATABASES").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unknown command \"SHOW DATABASES\""),
            "{text}"
        );
        for (command, _) in USAGE {
            assert!(text.contains(command), "{command} missing from {text}");
        }
        assert_eq!(err.sqlstate(), "42601");
        assert!(matches!(parse("select 1"), Err(ParseError::Unknown(_))));
        assert!(matches!(parse("PROMOTE"), Err(ParseError::Usage(..))));
        assert!(matches!(parse("PROMOTE a b c"), Err(ParseError::Usage(..))));
        assert!(matches!(parse("PAUSE a b"), Err(ParseError::Usage(..))));
    }
}
