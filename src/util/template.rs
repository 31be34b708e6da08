//! `${params.NAME}`, `${inputs.NAME}` and `${outputs.NAME}` references inside strings,
//! and `${item}` / `${item.KEY}` in foreach and matrix steps. `$${` writes a literal `${`.

/// A reference found in a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `params`, `inputs`, `outputs` or `item`.
    pub namespace: String,
    /// The name after the dot (empty for a bare `${item}`).
    pub name: String,
}

/// A malformed reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError(pub String);

/// What to do with escapes (`$${`) while substituting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escapes {
    /// Keep `$${` as is (an earlier pass; a later one will unescape).
    Keep,
    /// Turn `$${` into `${` (the final pass).
    Unescape,
}

/// All references in `text`, in order.
pub fn references(text: &str) -> Result<Vec<Reference>, TemplateError> {
    let mut refs = Vec::new();
    substitute(text, Escapes::Keep, &mut |r| {
        refs.push(r.clone());
        Ok(None)
    })?;
    Ok(refs)
}

/// Replaces each reference for which `replace` returns `Some`, keeping the others verbatim.
pub fn substitute(
    text: &str,
    escapes: Escapes,
    replace: &mut dyn FnMut(&Reference) -> Result<Option<String>, TemplateError>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("${") {
        let escaped = pos > 0 && rest.as_bytes()[pos - 1] == b'$';
        if escaped {
            out.push_str(&rest[..pos - 1]);
            out.push_str(match escapes {
                Escapes::Keep => "$${",
                Escapes::Unescape => "${",
            });
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let end = after.find('}').ok_or_else(|| {
            TemplateError(format!(
                "unterminated `${{` in `{text}`: close it with `}}`, or write `$${{` for a literal"
            ))
        })?;
        let inner = after[..end].trim();
        if inner.contains("${") {
            return Err(TemplateError(format!(
                "unterminated `${{` in `{text}`: close each reference with `}}`, or write `$${{` for a literal"
            )));
        }
        let reference = parse_reference(inner)?;
        match replace(&reference)? {
            Some(value) => out.push_str(&value),
            None => out.push_str(&rest[pos..pos + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// If the whole string is exactly one reference, that reference (typed substitution).
pub fn sole_reference(text: &str) -> Option<Reference> {
    let inner = text.strip_prefix("${")?.strip_suffix('}')?;
    if inner.contains('}') || inner.contains("${") {
        return None;
    }
    parse_reference(inner.trim()).ok()
}

fn parse_reference(inner: &str) -> Result<Reference, TemplateError> {
    if inner == ITEM {
        return Ok(Reference {
            namespace: ITEM.to_string(),
            name: String::new(),
        });
    }
    let (namespace, name) = inner.split_once('.').ok_or_else(|| {
        TemplateError(format!(
            "`${{{inner}}}` is not a reference: write `${{params.NAME}}`, `${{inputs.NAME}}`, `${{outputs.NAME}}` or `${{item.KEY}}`"
        ))
    })?;
    if !matches!(namespace, "params" | "inputs" | "outputs" | ITEM) {
        return Err(TemplateError(format!(
            "unknown reference `${{{inner}}}`: the namespace must be params, inputs, outputs or item"
        )));
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(TemplateError(format!(
            "`${{{inner}}}` names no valid {namespace} entry"
        )));
    }
    Ok(Reference {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// The namespace of foreach and matrix items.
pub const ITEM: &str = "item";

/// Text of a value when interpolated into a string.
pub fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_replaces_references() {
        let refs = references("a ${params.x} b ${inputs.y}").unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].namespace, "inputs");
        let out = substitute("n=${params.x}, keep ${inputs.y}", Escapes::Keep, &mut |r| {
            Ok((r.namespace == "params").then(|| "5".to_string()))
        })
        .unwrap();
        assert_eq!(out, "n=5, keep ${inputs.y}");
    }

    #[test]
    fn escapes_survive_until_the_final_pass() {
        let kept = substitute("$${HOME} ${params.a}", Escapes::Keep, &mut |_| {
            Ok(Some("1".into()))
        })
        .unwrap();
        assert_eq!(kept, "$${HOME} 1");
        let done = substitute(&kept, Escapes::Unescape, &mut |_| Ok(None)).unwrap();
        assert_eq!(done, "${HOME} 1");
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(references("${params.x").is_err());
        assert!(references("${foo.x}").is_err());
        assert!(references("${params}").is_err());
        assert_eq!(
            sole_reference("${params.size}").unwrap().name,
            "size".to_string()
        );
        assert!(sole_reference("x${params.size}").is_none());
        assert_eq!(sole_reference("${item}").unwrap().namespace, "item");
        assert_eq!(sole_reference("${item.rank}").unwrap().name, "rank");
    }
}
