//! Value types of configuration keys: parsing from command-line text and from TOML, rendering
//! back to both.
//!
//! Owns: the syntax of every value type (booleans, bounded integers, host names, lists, paths,
//! durations, enums, geometries, session command templates).
//! Never: reads files, knows key paths or cross-key rules (that is `load.rs`).
//!
//! Invariants:
//! - Parsing the rendering of a parsed value gives the same value (`parse(display(v)) == v`),
//!   both for command-line text and for TOML.
//! - A parse failure returns the description of what was expected, never a panic.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What one item of a list may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// Any word without whitespace (user and group names).
    Word,
    /// A host name or IP address.
    Host,
    /// An e-mail address.
    Email,
}

/// The type of a configuration key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    /// `true`/`false`, `yes`/`no`, `1`/`0`, any case.
    Bool,
    /// A decimal integer in `min..=max`.
    Int { min: i64, max: i64 },
    /// A host name or IP address.
    Host,
    /// A host name or IP address, or empty for "unset".
    OptHost,
    /// A word without whitespace, or empty for "unset".
    OptWord,
    /// A list; space-separated on the command line, a TOML array (or string) in files.
    List(ItemKind),
    /// An absolute path.
    Path,
    /// A path; relative paths are resolved against the configuration directory.
    SecretPath,
    /// `250ms`, `5s`, `2m`, `1h`, `7d`, or a bare number of seconds, in `min_ms..=max_ms`.
    Duration { min_ms: u64, max_ms: u64 },
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
    /// `WIDTHxHEIGHT`.
    Geometry,
    /// An argv template with placeholders `{display}`, `{port}`, `{geometry}`, `{user}`, `{socket}`.
    Command,
}

/// Placeholders allowed in a session command template.
pub const PLACEHOLDERS: &[&str] = &["display", "port", "geometry", "user", "socket"];

/// A parsed, type-checked value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    /// Host, optional host/word (empty = unset), enum word, geometry.
    Str(String),
    /// Lists and command templates.
    List(Vec<String>),
    Path(PathBuf),
    Duration(Duration),
}

impl ValueType {
    /// What a value of this type looks like, for error messages ("expected ...") and docs.
    pub fn expected(&self) -> String {
        match self {
            ValueType::Bool => "a boolean (true/false, yes/no, 1/0)".into(),
            ValueType::Int { min, max } => format!("an integer from {min} to {max}"),
            ValueType::Host => "a host name or IP address".into(),
            ValueType::OptHost => "a host name or IP address, or empty".into(),
            ValueType::OptWord => "a name without spaces, or empty".into(),
            ValueType::List(ItemKind::Word) => "a list of names without spaces".into(),
            ValueType::List(ItemKind::Host) => "a list of host names or IP addresses".into(),
            ValueType::List(ItemKind::Email) => "a list of e-mail addresses".into(),
            ValueType::Path => "an absolute path".into(),
            ValueType::SecretPath => "a path (relative paths are relative to the configuration directory)".into(),
            ValueType::Duration { min_ms, max_ms } => format!(
                "a duration such as 250ms, 5s, 1m30s, 1h or 7d (a bare number means seconds) from {} to {}",
                format_duration(Duration::from_millis(*min_ms)),
                format_duration(Duration::from_millis(*max_ms))
            ),
            ValueType::Enum(words) => format!("one of: {}", words.join(", ")),
            ValueType::Geometry => "a geometry WIDTHxHEIGHT such as 1024x768".into(),
            ValueType::Command => format!(
                "a command (list of arguments) using only the placeholders {}",
                PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(" ")
            ),
        }
    }

    /// A short type name for the documentation table.
    pub fn short_name(&self) -> String {
        match self {
            ValueType::Bool => "boolean".into(),
            ValueType::Int { min, max } => format!("integer {min}..{max}"),
            ValueType::Host => "host".into(),
            ValueType::OptHost => "host or empty".into(),
            ValueType::OptWord => "name or empty".into(),
            ValueType::List(ItemKind::Word) => "list of names".into(),
            ValueType::List(ItemKind::Host) => "list of hosts".into(),
            ValueType::List(ItemKind::Email) => "list of e-mail addresses".into(),
            ValueType::Path => "absolute path".into(),
            ValueType::SecretPath => "path".into(),
            ValueType::Duration { min_ms, max_ms } => format!(
                "duration {}..{}",
                format_duration(Duration::from_millis(*min_ms)),
                format_duration(Duration::from_millis(*max_ms))
            ),
            ValueType::Enum(words) => words.join(" \\| "),
            ValueType::Geometry => "geometry".into(),
            ValueType::Command => "command".into(),
        }
    }

    /// Parses command-line text (`tl-config /path=TEXT`). On failure returns what was expected.
    pub fn parse_text(&self, text: &str) -> Result<Value, String> {
        let t = text.trim();
        let fail = || Err(self.expected());
        match self {
            ValueType::Bool => match t.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "0" => Ok(Value::Bool(false)),
                _ => fail(),
            },
            ValueType::Int { .. } => match t.parse::<i64>() {
                Ok(n) => self.check_int(n),
                Err(_) => fail(),
            },
            ValueType::Host => {
                if t.is_empty() {
                    return fail();
                }
                check_host(t).map_err(|why| format!("{} ({why})", self.expected()))?;
                Ok(Value::Str(t.to_string()))
            }
            ValueType::OptHost => {
                if !t.is_empty() {
                    check_host(t).map_err(|why| format!("{} ({why})", self.expected()))?;
                }
                Ok(Value::Str(t.to_string()))
            }
            ValueType::OptWord => {
                if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return fail();
                }
                Ok(Value::Str(t.to_string()))
            }
            ValueType::List(kind) => self.check_list(t.split_whitespace().map(str::to_string).collect(), *kind),
            ValueType::Path => {
                if t.is_empty() || !t.starts_with('/') || t.contains('\0') {
                    return fail();
                }
                Ok(Value::Path(PathBuf::from(t)))
            }
            ValueType::SecretPath => {
                if t.is_empty() || t.contains('\0') {
                    return fail();
                }
                Ok(Value::Path(PathBuf::from(t)))
            }
            ValueType::Duration { min_ms, max_ms } => {
                let d = parse_duration(t).ok_or_else(|| self.expected())?;
                let ms = d.as_millis();
                if ms < u128::from(*min_ms) || ms > u128::from(*max_ms) {
                    return fail();
                }
                Ok(Value::Duration(d))
            }
            ValueType::Enum(words) => {
                let lower = t.to_ascii_lowercase();
                match words.iter().find(|w| **w == lower) {
                    Some(w) => Ok(Value::Str((*w).to_string())),
                    None => fail(),
                }
            }
            ValueType::Geometry => {
                if parse_geometry(t).is_some() {
                    Ok(Value::Str(t.to_string()))
                } else {
                    fail()
                }
            }
            ValueType::Command => self.check_command(t.split_whitespace().map(str::to_string).collect()),
        }
    }

    /// Parses a TOML value from a file. A TOML string is parsed like command-line text (so
    /// `enabled = "yes"` and `agents = "a b"` work); typed TOML values must fit the key's type.
    pub fn parse_toml(&self, v: &toml_edit::Value) -> Result<Value, String> {
        use toml_edit::Value as T;
        match (self, v) {
            (_, T::String(s)) => self.parse_text(s.value()),
            (ValueType::Bool, T::Boolean(b)) => Ok(Value::Bool(*b.value())),
            (ValueType::Bool, T::Integer(i)) => match *i.value() {
                0 => Ok(Value::Bool(false)),
                1 => Ok(Value::Bool(true)),
                _ => Err(self.expected()),
            },
            (ValueType::Int { .. }, T::Integer(i)) => self.check_int(*i.value()),
            (ValueType::Duration { .. }, T::Integer(i)) => self.parse_text(&i.value().to_string()),
            (ValueType::List(kind), T::Array(a)) => {
                let items = array_strings(a).ok_or_else(|| self.expected())?;
                self.check_list(items, *kind)
            }
            (ValueType::Command, T::Array(a)) => {
                let items = array_strings(a).ok_or_else(|| self.expected())?;
                self.check_command(items)
            }
            _ => Err(self.expected()),
        }
    }

    fn check_int(&self, n: i64) -> Result<Value, String> {
        match self {
            ValueType::Int { min, max } if (*min..=*max).contains(&n) => Ok(Value::Int(n)),
            _ => Err(self.expected()),
        }
    }

    fn check_list(&self, items: Vec<String>, kind: ItemKind) -> Result<Value, String> {
        for item in &items {
            let ok = match kind {
                ItemKind::Word => !item.is_empty() && !item.chars().any(|c| c.is_whitespace() || c.is_control()),
                ItemKind::Host => {
                    if let Err(why) = check_host(item) {
                        return Err(format!("{} ({item:?}: {why})", self.expected()));
                    }
                    true
                }
                ItemKind::Email => is_email(item),
            };
            if !ok {
                return Err(format!("{} ({item:?} is not valid)", self.expected()));
            }
        }
        Ok(Value::List(items))
    }

    fn check_command(&self, argv: Vec<String>) -> Result<Value, String> {
        if argv.is_empty() || argv[0].trim().is_empty() {
            return Err(format!("{} (the command is empty)", self.expected()));
        }
        for arg in &argv {
            check_placeholders(arg).map_err(|why| format!("{} ({why})", self.expected()))?;
        }
        Ok(Value::List(argv))
    }
}

fn array_strings(a: &toml_edit::Array) -> Option<Vec<String>> {
    a.iter().map(|v| v.as_str().map(str::to_string)).collect()
}

impl Value {
    /// Command-line rendering: what `tl-config /path` prints and what `parse_text` accepts.
    pub fn display(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(n) => n.to_string(),
            Value::Str(s) => s.clone(),
            Value::List(items) => items.join(" "),
            Value::Path(p) => p.display().to_string(),
            Value::Duration(d) => format_duration(*d),
        }
    }

    /// TOML rendering written by the editor: booleans as booleans, lists as arrays.
    pub fn to_toml(&self) -> toml_edit::Value {
        match self {
            Value::Bool(b) => (*b).into(),
            Value::Int(n) => (*n).into(),
            Value::Str(s) => s.as_str().into(),
            Value::List(items) => {
                let mut a = toml_edit::Array::new();
                for i in items {
                    a.push(i.as_str());
                }
                toml_edit::Value::Array(a)
            }
            Value::Path(p) => p.display().to_string().into(),
            Value::Duration(d) => format_duration(*d).into(),
        }
    }

    // Typed accessors used by the key table. A mismatch is a table bug, caught by the unit test
    // that applies every default; they return a neutral value instead of panicking.
    pub(crate) fn as_bool(&self) -> bool {
        matches!(self, Value::Bool(true))
    }
    pub(crate) fn as_int(&self) -> i64 {
        match self {
            Value::Int(n) => *n,
            _ => 0,
        }
    }
    pub(crate) fn as_u16(&self) -> u16 {
        u16::try_from(self.as_int()).unwrap_or(0)
    }
    pub(crate) fn as_u32(&self) -> u32 {
        u32::try_from(self.as_int()).unwrap_or(0)
    }
    pub(crate) fn as_u64(&self) -> u64 {
        u64::try_from(self.as_int()).unwrap_or(0)
    }
    pub(crate) fn as_str(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            other => other.display(),
        }
    }
    pub(crate) fn as_opt(&self) -> Option<String> {
        Some(self.as_str()).filter(|s| !s.is_empty())
    }
    pub(crate) fn as_list(&self) -> Vec<String> {
        match self {
            Value::List(items) => items.clone(),
            _ => Vec::new(),
        }
    }
    pub(crate) fn as_path(&self) -> PathBuf {
        match self {
            Value::Path(p) => p.clone(),
            other => PathBuf::from(other.display()),
        }
    }
    pub(crate) fn as_duration(&self) -> Duration {
        match self {
            Value::Duration(d) => *d,
            _ => Duration::ZERO,
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().ok()?.checked_mul(1_000).map(Duration::from_millis);
    }
    // One or more NUMBER UNIT parts, largest unit first, each unit at most once: `1m30s`.
    let mut rest = t;
    let mut total: u64 = 0;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        if ms_per_unit >= last_unit {
            return None;
        }
        last_unit = ms_per_unit;
        rest = &rest[unit_len..];
        total = total.checked_add(n.checked_mul(ms_per_unit)?)?;
    }
    (last_unit != u64::MAX).then(|| Duration::from_millis(total))
}

/// Renders a duration with the largest unit that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, per) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms % per == 0 {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Parses `WIDTHxHEIGHT`, each 1..=32767.
pub fn parse_geometry(text: &str) -> Option<(u16, u16)> {
    let (w, h) = text.split_once('x')?;
    let ok = |s: &str| -> Option<u16> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|n| (1..=32767).contains(n))
    };
    Some((ok(w)?, ok(h)?))
}

/// Checks host-name syntax: an IP address, or dot-separated labels of letters, digits and
/// hyphens (1 to 63 characters, not starting or ending with a hyphen), at most 253 characters.
pub fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if host.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    let labels: Vec<&str> = host.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err("empty label in host name".into());
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters".into());
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("only letters, digits, '-' and '.' are allowed".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'".into());
        }
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err("not a valid IP address".into());
    }
    Ok(())
}

fn is_email(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !local.chars().any(|c| c.is_whitespace() || c.is_control() || c == '@')
                && check_host(domain).is_ok()
        }
        None => false,
    }
}

fn check_placeholders(arg: &str) -> Result<(), String> {
    let mut rest = arg;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(format!("unmatched '}}' in {arg:?}"));
        }
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| format!("unmatched '{{' in {arg:?}"))?;
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!("unknown placeholder {{{name}}} in {arg:?}"));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: ValueType = ValueType::Int { min: 1, max: 65535 };
    const DUR: ValueType = ValueType::Duration { min_ms: 1, max_ms: 86_400_000 * 365 };

    fn toml_value(src: &str) -> toml_edit::Value {
        src.parse::<toml_edit::Value>().unwrap()
    }

    #[test]
    fn bool_accepts_all_spellings_any_case() {
        for t in ["true", "TRUE", "Yes", "1", " yes "] {
            assert_eq!(ValueType::Bool.parse_text(t), Ok(Value::Bool(true)), "{t}");
        }
        for t in ["false", "No", "0", "FALSE"] {
            assert_eq!(ValueType::Bool.parse_text(t), Ok(Value::Bool(false)), "{t}");
        }
        for t in ["", "2", "on", "truee"] {
            assert!(ValueType::Bool.parse_text(t).is_err(), "{t}");
        }
        assert_eq!(ValueType::Bool.parse_toml(&toml_value("true")), Ok(Value::Bool(true)));
        assert_eq!(ValueType::Bool.parse_toml(&toml_value("0")), Ok(Value::Bool(false)));
        assert_eq!(ValueType::Bool.parse_toml(&toml_value("\"no\"")), Ok(Value::Bool(false)));
        assert!(ValueType::Bool.parse_toml(&toml_value("2")).is_err());
        assert!(ValueType::Bool.parse_toml(&toml_value("1.0")).is_err());
        assert_eq!(Value::Bool(true).display(), "true");
        assert_eq!(Value::Bool(false).to_toml().to_string(), "false");
    }

    #[test]
    fn int_ranges() {
        assert_eq!(PORT.parse_text("9000"), Ok(Value::Int(9000)));
        assert_eq!(PORT.parse_text("65535"), Ok(Value::Int(65535)));
        let err = PORT.parse_text("0").unwrap_err();
        assert_eq!(err, "an integer from 1 to 65535");
        assert!(PORT.parse_text("65536").is_err());
        assert!(PORT.parse_text("-1").is_err());
        assert!(PORT.parse_text("90a").is_err());
        assert!(PORT.parse_text("").is_err());
        assert_eq!(PORT.parse_toml(&toml_value("904")), Ok(Value::Int(904)));
        assert_eq!(PORT.parse_toml(&toml_value("\"904\"")), Ok(Value::Int(904)));
        assert!(PORT.parse_toml(&toml_value("true")).is_err());
        assert!(PORT.parse_toml(&toml_value("70000")).is_err());
    }

    #[test]
    fn hosts() {
        for h in ["tlha", "tlha-primary.example.com", "10.0.0.2", "::1", "a1.b2", "AGENT1"] {
            assert!(check_host(h).is_ok(), "{h}");
        }
        for h in ["", "-a", "a-", "a..b", "a_b", "a b", "10.0.0.300", "1.2.3", "x/y", ".a"] {
            assert!(check_host(h).is_err(), "{h}");
        }
        assert!(check_host(&"a".repeat(64)).is_err());
        assert!(check_host(&["a"; 130].join(".")).is_err());
        assert_eq!(ValueType::Host.parse_text("tlha"), Ok(Value::Str("tlha".into())));
        assert!(ValueType::Host.parse_text("").is_err());
        assert_eq!(ValueType::OptHost.parse_text(""), Ok(Value::Str(String::new())));
        assert!(ValueType::OptHost.parse_text("bad host").is_err());
        assert_eq!(ValueType::OptWord.parse_text("wheel"), Ok(Value::Str("wheel".into())));
        assert!(ValueType::OptWord.parse_text("a b").is_err());
    }

    #[test]
    fn lists_from_text_array_and_string() {
        let hosts = ValueType::List(ItemKind::Host);
        let want = Value::List(vec!["tlha-primary".into(), "tlha-secondary".into()]);
        assert_eq!(hosts.parse_text(" tlha-primary   tlha-secondary "), Ok(want.clone()));
        assert_eq!(hosts.parse_toml(&toml_value(r#"["tlha-primary", "tlha-secondary"]"#)), Ok(want.clone()));
        assert_eq!(hosts.parse_toml(&toml_value(r#""tlha-primary tlha-secondary""#)), Ok(want.clone()));
        assert_eq!(hosts.parse_text(""), Ok(Value::List(vec![])));
        let err = hosts.parse_text("good bad_host").unwrap_err();
        assert!(err.contains("bad_host"), "{err}");
        assert!(hosts.parse_toml(&toml_value("[1, 2]")).is_err());
        assert!(hosts.parse_toml(&toml_value("5")).is_err());
        assert_eq!(want.display(), "tlha-primary tlha-secondary");
        assert_eq!(want.to_toml().to_string(), r#"["tlha-primary", "tlha-secondary"]"#);
        let words = ValueType::List(ItemKind::Word);
        assert!(words.parse_toml(&toml_value(r#"["a b"]"#)).is_err());
        assert!(words.parse_toml(&toml_value(r#"[""]"#)).is_err());
        let mails = ValueType::List(ItemKind::Email);
        assert!(mails.parse_text("root@localhost ops@example.com").is_ok());
        for bad in ["root", "@x", "a@", "a@b@c", "a@bad_domain"] {
            assert!(mails.parse_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(ValueType::Path.parse_text("/var/lib/vsm"), Ok(Value::Path("/var/lib/vsm".into())));
        assert!(ValueType::Path.parse_text("var/lib").is_err());
        assert!(ValueType::Path.parse_text("").is_err());
        assert_eq!(ValueType::SecretPath.parse_text("ha.key"), Ok(Value::Path("ha.key".into())));
        assert!(ValueType::SecretPath.parse_text("").is_err());
        assert!(ValueType::Path.parse_toml(&toml_value("3")).is_err());
    }

    #[test]
    fn durations() {
        let cases = [
            ("250ms", 250),
            ("5s", 5_000),
            ("5", 5_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("7d", 604_800_000),
            (" 30s ", 30_000),
            ("1m30s", 90_000),
            ("1h30m", 5_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("1s500ms", 1_500),
        ];
        for (t, ms) in cases {
            assert_eq!(DUR.parse_text(t), Ok(Value::Duration(Duration::from_millis(ms))), "{t}");
        }
        for t in
            ["", "s", "5x", "1.5s", "-1s", "5 s s", "99999999999999999999d", "0s", "30s1m", "1m1m", "1m 30s", "1m30"]
        {
            assert!(DUR.parse_text(t).is_err(), "{t}");
        }
        assert_eq!(DUR.parse_toml(&toml_value("30")), Ok(Value::Duration(Duration::from_secs(30))));
        assert!(DUR.parse_toml(&toml_value("true")).is_err());
        for (ms, s) in [(500, "500ms"), (30_000, "30s"), (120_000, "2m"), (604_800_000, "7d"), (1_500, "1500ms")] {
            assert_eq!(format_duration(Duration::from_millis(ms)), s);
            assert_eq!(DUR.parse_text(s), Ok(Value::Duration(Duration::from_millis(ms))));
        }
        let short = ValueType::Duration { min_ms: 10, max_ms: 1000 };
        assert!(short.parse_text("5ms").is_err());
        assert!(short.parse_text("2s").is_err());
        assert!(short.expected().contains("from 10ms to 1s"));
    }

    #[test]
    fn enums() {
        let sync = ValueType::Enum(&["async", "ack"]);
        assert_eq!(sync.parse_text("ack"), Ok(Value::Str("ack".into())));
        assert_eq!(sync.parse_text("ASYNC"), Ok(Value::Str("async".into())));
        assert_eq!(sync.parse_text("sync").unwrap_err(), "one of: async, ack");
        assert!(sync.parse_toml(&toml_value("1")).is_err());
    }

    #[test]
    fn geometry() {
        assert_eq!(parse_geometry("1024x768"), Some((1024, 768)));
        for bad in ["1024 768", "x768", "1024x", "0x10", "10x99999", "+1x1", "axb"] {
            assert!(ValueType::Geometry.parse_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_templates() {
        let c = ValueType::Command;
        let v = c.parse_text("Xvnc :{display} -rfbport {port} -geometry {geometry} -desktop {user}").unwrap();
        assert_eq!(v.as_list().len(), 8);
        assert!(c.parse_toml(&toml_value(r#"["sh", "-c", "echo {user} x"]"#)).is_ok());
        let err = c.parse_text("Xvnc {home}").unwrap_err();
        assert!(err.contains("unknown placeholder {home}"), "{err}");
        assert!(c.parse_text("Xvnc {display").unwrap_err().contains("unmatched '{'"));
        assert!(c.parse_text("Xvnc display}").unwrap_err().contains("unmatched '}'"));
        assert!(c.parse_text("").unwrap_err().contains("empty"));
        assert!(c.parse_toml(&toml_value(r#"[""]"#)).is_err());
    }

    #[test]
    fn text_round_trip_for_every_kind() {
        let types = [
            ValueType::Bool,
            PORT,
            ValueType::Host,
            ValueType::OptHost,
            ValueType::List(ItemKind::Host),
            ValueType::Path,
            DUR,
            ValueType::Geometry,
            ValueType::Command,
        ];
        let texts = ["yes", "904", "tlha", "", "a b", "/x", "90s", "800x600", "Xvnc :{display}"];
        for (ty, t) in types.iter().zip(texts) {
            let v = ty.parse_text(t).unwrap();
            assert_eq!(ty.parse_text(&v.display()), Ok(v.clone()), "{ty:?}");
            assert_eq!(ty.parse_toml(&v.to_toml()), Ok(v), "{ty:?}");
        }
    }
}
