//! `ps --json`: the daemon's JSON as it was sent (same keys, same order), indented for people.

/// Re-indents valid JSON `text` with two spaces per level, the way `serde_json`'s pretty printer
/// does, without reordering object keys. Returns `None` when `text` is not valid JSON.
pub fn pretty(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 2));
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                let mut escaped = false;
                for s in chars.by_ref() {
                    out.push(s);
                    if escaped {
                        escaped = false;
                    } else if s == '\\' {
                        escaped = true;
                    } else if s == '"' {
                        break;
                    }
                }
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while chars.peek().is_some_and(|n| n.is_ascii_whitespace()) {
                    chars.next();
                }
                out.push(c);
                if chars.peek() == Some(&close) {
                    chars.next();
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_serde_json_pretty_except_for_key_order() {
        let text = r#"[{"id":"a","aliases":[],"state":"ready","pid":null,"n":{"x":[1,2]},"e":{}},{"id":"b\"q,:{"}]"#;
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        let ours = pretty(text).unwrap();
        let reparsed: serde_json::Value = serde_json::from_str(&ours).unwrap();
        assert_eq!(value, reparsed);
        assert_eq!(
            ours,
            r#"[
  {
    "id": "a",
    "aliases": [],
    "state": "ready",
    "pid": null,
    "n": {
      "x": [
        1,
        2
      ]
    },
    "e": {}
  },
  {
    "id": "b\"q,:{"
  }
]"#
        );
    }

    #[test]
    fn already_pretty_input_comes_out_the_same() {
        let once = pretty("[ { \"a\" : [ ] , \"b\":1 } ]").unwrap();
        assert_eq!(pretty(&once).unwrap(), once);
        assert_eq!(pretty("[]").unwrap(), "[]");
    }

    #[test]
    fn invalid_json_is_refused() {
        assert_eq!(pretty("[1,"), None);
        assert_eq!(pretty("<html>"), None);
    }
}
