//! Finds the top-level `"model"` string in a JSON request body without parsing the whole
//! document, so large bodies can be routed from their first bytes and streamed on.
//!
//! Only the path to `model` is checked; everything after it is left for the model server to
//! validate. Nested values are skipped structurally (strings with memchr), not parsed.

use std::borrow::Cow;

#[derive(Debug, PartialEq, Eq)]
pub enum Extract<'a> {
    /// `span` covers the value's string literal, quotes included.
    Found {
        model: Cow<'a, str>,
        span: (usize, usize),
    },
    /// More bytes are needed before a decision can be made.
    Incomplete,
    /// The object ended without a top-level `model`.
    Missing,
    Invalid(&'static str),
}

pub fn find_model(body: &[u8]) -> Extract<'_> {
    match scan(body) {
        Ok(found) => found,
        Err(Stop::Incomplete) => Extract::Incomplete,
        Err(Stop::Invalid(why)) => Extract::Invalid(why),
    }
}

enum Stop {
    Incomplete,
    Invalid(&'static str),
}

type Scan<T> = Result<T, Stop>;

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> Scan<usize> {
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            _ => return Ok(i),
        }
    }
    Err(Stop::Incomplete)
}

/// `i` points at an opening quote; returns the index just past the closing quote and
/// whether the string had escapes.
#[inline]
fn skip_string(b: &[u8], i: usize) -> Scan<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        match memchr::memchr2(b'"', b'\\', &b[j..]) {
            None => return Err(Stop::Incomplete),
            Some(k) => {
                let at = j + k;
                if b[at] == b'"' {
                    return Ok((at + 1, escaped));
                }
                escaped = true;
                if at + 1 >= b.len() {
                    return Err(Stop::Incomplete);
                }
                j = at + 2;
            }
        }
    }
}

/// Skip one value of any kind starting at `i`; returns the index just past it.
fn skip_value(b: &[u8], i: usize) -> Scan<usize> {
    match b[i] {
        b'"' => Ok(skip_string(b, i)?.0),
        b'{' | b'[' => {
            // Brackets are only counted, not matched by kind: the server validates.
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(Stop::Incomplete)
        }
        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' => return Ok(j),
                    _ => j += 1,
                }
            }
            Err(Stop::Incomplete)
        }
        _ => Err(Stop::Invalid(
            "malformed JSON: unexpected character in a value",
        )),
    }
}

fn scan(b: &[u8]) -> Scan<Extract<'_>> {
    let mut i = skip_ws(b, 0)?;
    if b[i] != b'{' {
        return Err(Stop::Invalid(
            "malformed JSON: the body must be a JSON object",
        ));
    }
    i += 1;
    loop {
        i = skip_ws(b, i)?;
        match b[i] {
            b'}' => return Ok(Extract::Missing),
            b'"' => {}
            _ => return Err(Stop::Invalid("malformed JSON: expected a quoted key")),
        }
        let (key_end, _) = skip_string(b, i)?;
        let is_model = &b[i + 1..key_end - 1] == b"model";
        i = skip_ws(b, key_end)?;
        if b[i] != b':' {
            return Err(Stop::Invalid("malformed JSON: expected ':' after a key"));
        }
        i = skip_ws(b, i + 1)?;
        if is_model {
            if b[i] != b'"' {
                return Err(Stop::Invalid("`model` must be a string"));
            }
            let (end, escaped) = skip_string(b, i)?;
            let model = if escaped {
                match serde_json::from_slice::<String>(&b[i..end]) {
                    Ok(s) => Cow::Owned(s),
                    Err(_) => return Err(Stop::Invalid("malformed JSON: bad escape in `model`")),
                }
            } else {
                match std::str::from_utf8(&b[i + 1..end - 1]) {
                    Ok(s) => Cow::Borrowed(s),
                    Err(_) => return Err(Stop::Invalid("`model` is not valid UTF-8")),
                }
            };
            return Ok(Extract::Found {
                model,
                span: (i, end),
            });
        }
        i = skip_value(b, i)?;
        i = skip_ws(b, i)?;
        match b[i] {
            b',' => i += 1,
            b'}' => return Ok(Extract::Missing),
            _ => return Err(Stop::Invalid("malformed JSON: expected ',' or '}'")),
        }
    }
}

/// For a body held whole: check that the object continues well-formed after the model's
/// value and ends the body, so a truncated or garbled tail gets a 400 here rather than
/// reaching the model server. Structural only (strings and brackets), like `find_model`.
pub fn check_rest(body: &[u8], model_end: usize) -> Result<(), &'static str> {
    let truncated = "malformed JSON: the body ends before the object does";
    let stop = |s: Stop| match s {
        Stop::Incomplete => truncated,
        Stop::Invalid(why) => why,
    };
    let mut i = model_end;
    loop {
        i = skip_ws(body, i).map_err(stop)?;
        match body[i] {
            b'}' => break,
            b',' => {}
            _ => return Err("malformed JSON: expected ',' or '}'"),
        }
        i = skip_ws(body, i + 1).map_err(stop)?;
        if body[i] != b'"' {
            return Err("malformed JSON: expected a quoted key");
        }
        i = skip_string(body, i).map_err(stop)?.0;
        i = skip_ws(body, i).map_err(stop)?;
        if body[i] != b':' {
            return Err("malformed JSON: expected ':' after a key");
        }
        i = skip_ws(body, i + 1).map_err(stop)?;
        i = skip_value(body, i).map_err(stop)?;
    }
    if body[i + 1..].iter().all(|b| b.is_ascii_whitespace()) {
        Ok(())
    } else {
        Err("malformed JSON: data after the end of the object")
    }
}

/// The body with the model's string literal replaced by `replacement` (a JSON literal).
pub fn rewrite(body: &[u8], span: (usize, usize), replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() - (span.1 - span.0) + replacement.len());
    out.extend_from_slice(&body[..span.0]);
    out.extend_from_slice(replacement);
    out.extend_from_slice(&body[span.1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(body: &str) -> String {
        match find_model(body.as_bytes()) {
            Extract::Found { model, .. } => model.into_owned(),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn finds_model_first_last_and_after_nesting() {
        assert_eq!(found(r#"{"model":"a","messages":[]}"#), "a");
        assert_eq!(
            found(
                r#" { "messages" : [{"role":"user","content":"x\"}{]"}], "n": -1.5e3, "ok": true, "z": null, "model" : "b" }"#
            ),
            "b"
        );
        assert_eq!(found(r#"{"model":"a\u0062\"c"}"#), "ab\"c");
        assert_eq!(found(r#"{"m":{"model":"inner"},"model":"outer"}"#), "outer");
    }

    #[test]
    fn span_covers_the_literal_and_rewrite_splices() {
        let body = br#"{"x":1,"model":"short","y":2}"#;
        let Extract::Found { span, .. } = find_model(body) else {
            panic!()
        };
        assert_eq!(&body[span.0..span.1], br#""short""#);
        let out = rewrite(body, span, br#""org/a-much-longer-name""#);
        assert_eq!(
            out,
            br#"{"x":1,"model":"org/a-much-longer-name","y":2}"#.to_vec()
        );
    }

    #[test]
    fn incomplete_missing_and_invalid() {
        assert_eq!(find_model(br#"{"messages":[{"a":"#), Extract::Incomplete);
        assert_eq!(find_model(br#"{"model":"ab"#), Extract::Incomplete);
        assert_eq!(find_model(b""), Extract::Incomplete);
        assert_eq!(find_model(br#"{"messages":[]}"#), Extract::Missing);
        assert_eq!(find_model(br#"{}"#), Extract::Missing);
        assert!(matches!(find_model(b"not json"), Extract::Invalid(_)));
        assert!(matches!(find_model(br#"[1,2]"#), Extract::Invalid(_)));
        assert!(matches!(
            find_model(br#"{"model":42}"#),
            Extract::Invalid(_)
        ));
        assert!(matches!(find_model(br#"{"a" 1}"#), Extract::Invalid(_)));
        assert!(matches!(
            find_model(br#"{"a":1 "model":"x"}"#),
            Extract::Invalid(_)
        ));
    }

    #[test]
    fn check_rest_catches_bad_tails() {
        let check = |b: &str| {
            let Extract::Found { span, .. } = find_model(b.as_bytes()) else {
                panic!("{b}")
            };
            check_rest(b.as_bytes(), span.1)
        };
        assert!(check(r#"{"model":"m"}"#).is_ok());
        assert!(check(r#"{"a":[1,{"b":"}"}],"model":"m", "c" : {"d":[]} } "#).is_ok());
        assert!(check(r#"{"model":"m", "#).is_err());
        assert!(check(r#"{"model":"m","x":[1,2}"#).is_err());
        assert!(check(r#"{"model":"m"} trailing"#).is_err());
        assert!(check(r#"{"model":"m" "x":1}"#).is_err());
        assert!(check(r#"{"model":"m","x":}"#).is_err());
    }

    #[test]
    fn agrees_with_serde_on_generated_bodies() {
        for pad in [0usize, 10, 1000, 100_000] {
            let v = serde_json::json!({
                "messages": [{"role": "user", "content": "é{[\"".repeat(pad / 4 + 1)}],
                "temperature": 0.5,
                "model": "m/x-1",
            });
            let text = serde_json::to_string(&v).unwrap();
            assert_eq!(found(&text), v["model"].as_str().unwrap());
            // Every strict prefix is either incomplete or (once past the model) found.
            for cut in (0..text.len()).step_by(text.len() / 50 + 1) {
                assert!(!matches!(
                    find_model(&text.as_bytes()[..cut]),
                    Extract::Invalid(_)
                ));
            }
        }
    }
}
