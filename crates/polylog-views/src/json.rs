//! Just enough JSON for the hot path: splitting an object into its top-level fields without
//! parsing the values, which are copied into documents as they are.

use std::borrow::Cow;

/// A JSON object's top-level fields, in order: `(name, raw value)`.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    pub items: Vec<(Cow<'a, str>, &'a [u8])>,
}

impl<'a> Fields<'a> {
    /// Splits `bytes`, which must hold one JSON object (`None` otherwise).
    pub fn parse(bytes: &'a [u8]) -> Option<Fields<'a>> {
        let mut items = Vec::new();
        let mut i = skip_ws(bytes, 0);
        if bytes.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_ws(bytes, i + 1);
        if bytes.get(i) == Some(&b'}') {
            return (skip_ws(bytes, i + 1) == bytes.len()).then_some(Fields { items });
        }
        loop {
            let key_end = string_end(bytes, i)?;
            let raw_key = &bytes[i..key_end];
            let key = if raw_key.contains(&b'\\') {
                Cow::Owned(serde_json::from_slice::<String>(raw_key).ok()?)
            } else {
                Cow::Borrowed(std::str::from_utf8(&raw_key[1..raw_key.len() - 1]).ok()?)
            };
            i = skip_ws(bytes, key_end);
            if bytes.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(bytes, i + 1);
            let end = value_end(bytes, start)?;
            items.push((key, &bytes[start..end]));
            i = skip_ws(bytes, end);
            match bytes.get(i) {
                Some(b',') => i = skip_ws(bytes, i + 1),
                Some(b'}') => {
                    return (skip_ws(bytes, i + 1) == bytes.len()).then_some(Fields { items });
                }
                _ => return None,
            }
        }
    }

    /// The raw value of a field.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.items.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the string starting at `i` (which must be `"`).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// The index after the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Appends `s` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    polylog_postgres::event::write_str(out, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_like_serde_parses() {
        let cases = [
            r#"{}"#,
            r#" { "a" : 1 , "b":"x,}y\"z", "c":{"d":[1,{"e":"]"}]}, "e\u00e9":null, "f":-1.5e3, "g":true } "#,
            r#"{"k":[]}"#,
        ];
        for c in cases {
            let f = Fields::parse(c.as_bytes()).expect(c);
            let want: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(c).expect(c);
            assert_eq!(f.items.len(), want.len(), "{c}");
            for (k, raw) in &f.items {
                let v: serde_json::Value = serde_json::from_slice(raw).expect("a raw value parses");
                assert_eq!(Some(&v), want.get(k.as_ref()), "{c} {k}");
            }
        }
        for bad in [r#"{"a":1"#, r#"[1]"#, r#"{"a" 1}"#, r#"{"a":1}x"#, ""] {
            assert!(Fields::parse(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
