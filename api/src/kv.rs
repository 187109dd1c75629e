//! A parser for `key=value,key=value` option strings.
//!
//! Both `arbor-remote` (`add-disk path=/img,readonly=on`) and the `arbor`
//! command line (`--disk path=/img,readonly=on`) describe devices this way, so
//! the parser lives here where both can use it.
//!
//! Syntax:
//! - Items are separated by commas. An item is `key=value`; the value runs to
//!   the next comma and may itself contain `=`.
//! - A value may be wrapped in double quotes to include commas:
//!   `path="/images/a,b.raw"`. Quotes are removed; there are no escapes.
//! - Keys are case-sensitive, must be in the caller's list of allowed keys and
//!   may appear only once. Empty items and empty values are refused.
//! - With [`parse_with_positional`], the first item may omit `key=`; its value
//!   then belongs to the named key (`remove-device disk0` means `id=disk0`).
//!
//! Typed access goes through [`KvOptions`]: [`KvOptions::bool`] accepts
//! `on|off|true|false`, [`KvOptions::parse`] accepts anything implementing
//! [`std::str::FromStr`]. Every error names the offending key and is one
//! sentence suitable for a user.

use std::fmt::Display;
use std::str::FromStr;

/// What was wrong with an option string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// An item has no `=` (and is not an allowed positional value).
    #[error("option '{item}' is not of the form key=value")]
    MissingEquals { item: String },
    /// An item starts with `=`.
    #[error("option '{item}' has an empty key")]
    EmptyKey { item: String },
    /// A key has nothing after `=`.
    #[error("option '{key}' has an empty value")]
    EmptyValue { key: String },
    /// Two commas in a row, or a leading or trailing comma.
    #[error("empty option in '{input}' (two commas in a row, or a comma at either end)")]
    EmptyItem { input: String },
    /// A double quote was opened and never closed.
    #[error("unterminated double quote in '{input}'")]
    UnterminatedQuote { input: String },
    /// A double quote that does not wrap a whole value.
    #[error("option '{key}' has a misplaced double quote (quote the whole value)")]
    MisplacedQuote { key: String },
    /// The key is not one the caller accepts.
    #[error("unknown option '{key}' (expected one of: {allowed})")]
    UnknownKey { key: String, allowed: String },
    /// The key appears twice.
    #[error("option '{key}' is given more than once")]
    DuplicateKey { key: String },
    /// A required key is absent.
    #[error("missing required option '{key}'")]
    MissingKey { key: String },
    /// A boolean option is not `on`, `off`, `true` or `false`.
    #[error("option '{key}' must be on, off, true or false, not '{value}'")]
    InvalidBool { key: String, value: String },
    /// A value failed to parse into the caller's type.
    #[error("invalid value '{value}' for option '{key}': {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
}

/// Parsed options, in the order they were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvOptions {
    pairs: Vec<(String, String)>,
}

/// Parses `input`, accepting only keys listed in `allowed`.
///
/// An empty (or all-whitespace) input yields no options.
pub fn parse(input: &str, allowed: &[&str]) -> Result<KvOptions, KvError> {
    parse_inner(input, allowed, None)
}

/// Like [`parse`], but the first item may be a bare value for `positional`
/// (which must also be listed in `allowed`): `disk0,force=on` is read as
/// `id=disk0,force=on` when `positional` is `"id"`. A bare first item that
/// contains `=` is read as `key=value`, so quote it (`"a=b"`) to force the
/// positional reading.
pub fn parse_with_positional(
    input: &str,
    allowed: &[&str],
    positional: &str,
) -> Result<KvOptions, KvError> {
    parse_inner(input, allowed, Some(positional))
}

/// One comma-separated item: its key (absent for a bare value) and its
/// value with quotes removed.
struct Item {
    key: Option<String>,
    value: String,
}

fn parse_inner(
    input: &str,
    allowed: &[&str],
    positional: Option<&str>,
) -> Result<KvOptions, KvError> {
    let mut opts = KvOptions::default();
    if input.trim().is_empty() {
        return Ok(opts);
    }
    for (index, raw) in split_items(input)?.into_iter().enumerate() {
        let item = parse_item(raw, input)?;
        let key = match item.key {
            Some(k) => k,
            None => match positional {
                Some(p) if index == 0 => p.to_string(),
                _ => return Err(KvError::MissingEquals { item: raw.into() }),
            },
        };
        if !allowed.contains(&key.as_str()) {
            return Err(KvError::UnknownKey {
                key,
                allowed: allowed.join(", "),
            });
        }
        if opts.contains(&key) {
            return Err(KvError::DuplicateKey { key });
        }
        if item.value.is_empty() {
            return Err(KvError::EmptyValue { key });
        }
        opts.pairs.push((key, item.value));
    }
    Ok(opts)
}

/// Splits `input` on commas that are outside double quotes.
fn split_items(input: &str) -> Result<Vec<&str>, KvError> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in input.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(KvError::UnterminatedQuote {
            input: input.to_string(),
        });
    }
    items.push(&input[start..]);
    Ok(items)
}

/// Separates the key from the value of one item and removes quotes.
fn parse_item(raw: &str, input: &str) -> Result<Item, KvError> {
    if raw.is_empty() {
        return Err(KvError::EmptyItem {
            input: input.to_string(),
        });
    }
    let (key, value) = if raw.starts_with('"') {
        (None, raw)
    } else {
        match raw.split_once('=') {
            Some(("", _)) => {
                return Err(KvError::EmptyKey {
                    item: raw.to_string(),
                })
            }
            Some((k, v)) => (Some(k), v),
            None => (None, raw),
        }
    };
    let misplaced = || KvError::MisplacedQuote {
        key: key.unwrap_or(raw).to_string(),
    };
    let value = match value.strip_prefix('"') {
        Some(rest) => match rest.split_once('"') {
            Some((inner, "")) => inner,
            _ => return Err(misplaced()),
        },
        None if value.contains('"') => return Err(misplaced()),
        None => value,
    };
    Ok(Item {
        key: key.map(str::to_string),
        value: value.to_string(),
    })
}

/// Parses an `on|off|true|false` value for `key`.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, KvError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(KvError::InvalidBool {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl KvOptions {
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` as an owned string, if given.
    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_string)
    }

    /// The value of `key`, or [`KvError::MissingKey`].
    pub fn required(&self, key: &str) -> Result<&str, KvError> {
        self.get(key).ok_or_else(|| KvError::MissingKey {
            key: key.to_string(),
        })
    }

    /// The value of `key` read as `on|off|true|false`, if given.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, KvError> {
        self.get(key).map(|v| parse_bool(key, v)).transpose()
    }

    /// The value of `key` parsed with [`FromStr`], if given.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, KvError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>().map_err(|e| KvError::InvalidValue {
                    key: key.to_string(),
                    value: v.to_string(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Whether `key` was given.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Whether no options were given.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// All options, in input order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["path", "readonly", "id", "serial"];

    #[test]
    fn parses_pairs_in_order() {
        let o = parse("path=/a/b.raw,readonly=on,id=d0", KEYS).unwrap();
        assert_eq!(o.get("path"), Some("/a/b.raw"));
        assert_eq!(o.bool("readonly").unwrap(), Some(true));
        assert_eq!(o.get("id"), Some("d0"));
        assert_eq!(o.get("serial"), None);
        let keys: Vec<_> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["path", "readonly", "id"]);
    }

    #[test]
    fn empty_input_is_no_options() {
        assert!(parse("", KEYS).unwrap().is_empty());
        assert!(parse("  ", KEYS).unwrap().is_empty());
    }

    #[test]
    fn value_may_contain_equals() {
        let o = parse("serial=a=b", KEYS).unwrap();
        assert_eq!(o.get("serial"), Some("a=b"));
    }

    #[test]
    fn quoted_values_keep_commas() {
        let o = parse("path=\"/x/a,b.raw\",id=d", KEYS).unwrap();
        assert_eq!(o.get("path"), Some("/x/a,b.raw"));
        assert_eq!(o.get("id"), Some("d"));
        let o = parse("id=d,path=\"/x,y\"", KEYS).unwrap();
        assert_eq!(o.get("path"), Some("/x,y"));
    }

    #[test]
    fn unterminated_quote() {
        assert!(matches!(
            parse("path=\"/x,id=d", KEYS),
            Err(KvError::UnterminatedQuote { .. })
        ));
    }

    #[test]
    fn text_after_quote() {
        assert_eq!(
            parse("path=\"/x\"y", KEYS),
            Err(KvError::MisplacedQuote { key: "path".into() })
        );
        assert_eq!(
            parse("path=/x\"y\"", KEYS),
            Err(KvError::MisplacedQuote { key: "path".into() })
        );
    }

    #[test]
    fn unknown_key() {
        let e = parse("path=/a,colour=red", KEYS).unwrap_err();
        assert_eq!(
            e,
            KvError::UnknownKey {
                key: "colour".into(),
                allowed: "path, readonly, id, serial".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown option 'colour' (expected one of: path, readonly, id, serial)"
        );
    }

    #[test]
    fn duplicate_key() {
        assert_eq!(
            parse("id=a,id=b", KEYS),
            Err(KvError::DuplicateKey { key: "id".into() })
        );
    }

    #[test]
    fn missing_equals() {
        assert_eq!(
            parse("path=/a,readonly", KEYS),
            Err(KvError::MissingEquals {
                item: "readonly".into()
            })
        );
        assert_eq!(
            parse("/a", KEYS),
            Err(KvError::MissingEquals { item: "/a".into() })
        );
    }

    #[test]
    fn empty_key_value_and_items() {
        assert!(matches!(parse("=x", KEYS), Err(KvError::EmptyKey { .. })));
        assert_eq!(
            parse("id=", KEYS),
            Err(KvError::EmptyValue { key: "id".into() })
        );
        assert!(matches!(
            parse("id=a,,path=b", KEYS),
            Err(KvError::EmptyItem { .. })
        ));
        assert!(matches!(
            parse(",id=a", KEYS),
            Err(KvError::EmptyItem { .. })
        ));
        assert!(matches!(
            parse("id=a,", KEYS),
            Err(KvError::EmptyItem { .. })
        ));
    }

    #[test]
    fn booleans() {
        for (v, b) in [
            ("on", true),
            ("true", true),
            ("off", false),
            ("false", false),
        ] {
            let o = parse(&format!("readonly={v}"), KEYS).unwrap();
            assert_eq!(o.bool("readonly").unwrap(), Some(b));
        }
        let o = parse("readonly=yes", KEYS).unwrap();
        assert_eq!(
            o.bool("readonly").unwrap_err().to_string(),
            "option 'readonly' must be on, off, true or false, not 'yes'"
        );
        assert_eq!(o.bool("id").unwrap(), None);
    }

    #[test]
    fn typed_values() {
        let o = parse("id=12,serial=x", KEYS).unwrap();
        assert_eq!(o.parse::<u32>("id").unwrap(), Some(12));
        assert!(matches!(
            o.parse::<u32>("serial"),
            Err(KvError::InvalidValue { .. })
        ));
        assert_eq!(o.parse::<u32>("path").unwrap(), None);
    }

    #[test]
    fn required() {
        let o = parse("id=a", KEYS).unwrap();
        assert_eq!(o.required("id").unwrap(), "a");
        assert_eq!(
            o.required("path").unwrap_err().to_string(),
            "missing required option 'path'"
        );
    }

    #[test]
    fn positional_first_item() {
        let o = parse_with_positional("disk0", &["id"], "id").unwrap();
        assert_eq!(o.get("id"), Some("disk0"));
        let o = parse_with_positional("/img.raw,readonly=on", KEYS, "path").unwrap();
        assert_eq!(o.get("path"), Some("/img.raw"));
        assert_eq!(o.bool("readonly").unwrap(), Some(true));
        // Explicit key=value still works, and the positional only applies
        // to the first item.
        let o = parse_with_positional("id=disk0", &["id"], "id").unwrap();
        assert_eq!(o.get("id"), Some("disk0"));
        assert!(matches!(
            parse_with_positional("readonly=on,/img", KEYS, "path"),
            Err(KvError::MissingEquals { .. })
        ));
        // The positional key counts for duplicates.
        assert_eq!(
            parse_with_positional("d0,id=d1", &["id"], "id"),
            Err(KvError::DuplicateKey { key: "id".into() })
        );
        // Quoting forces the positional reading of a value with '='.
        let o = parse_with_positional("\"a=b\"", &["id"], "id").unwrap();
        assert_eq!(o.get("id"), Some("a=b"));
    }
}
