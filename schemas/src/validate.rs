//! A small JSON Schema checker for the keywords `rl_record.schema.json` uses,
//! so records can be checked without a full JSON Schema implementation.
//!
//! Supported: `$ref` (local `#/...` pointers), `type` (string or list),
//! `enum`, `required`, `dependentRequired`, `properties`, `additionalProperties` (boolean),
//! `items` (one schema), `minimum`, `not`.  Annotation keywords
//! (`description`, `title`, ...) are ignored.  Unknown assertion keywords make
//! the check fail loudly rather than pass silently.

use serde_json::Value;

const KNOWN: [&str; 15] = [
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "type",
    "enum",
    "required",
    "dependentRequired",
    "properties",
    "additionalProperties",
    "items",
    "minimum",
    "not",
];

/// Checks `instance` against `schema` (resolving `$ref`s in `root`); returns
/// every violation as `"<json path>: <what>"`.
pub fn validate(root: &Value, schema: &Value, instance: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    check(root, schema, instance, "$", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks one query record (the value under `"<query_idx>"`) against [`crate::json_schema`].
pub fn validate_record(record: &Value) -> Result<(), Vec<String>> {
    let root = crate::json_schema();
    validate(&root, &root, record)
}

/// Checks a `_meta` object against `$defs/meta` of [`crate::json_schema`].
pub fn validate_meta(meta: &Value) -> Result<(), Vec<String>> {
    let root = crate::json_schema();
    let schema = root["$defs"]["meta"].clone();
    validate(&root, &schema, meta)
}

fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    root.pointer(reference.strip_prefix('#')?)
}

fn type_matches(name: &str, v: &Value) -> bool {
    match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_u64() || v.is_i64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

fn check(root: &Value, schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{path}: not allowed"));
        }
        return;
    };
    for key in obj.keys() {
        if !KNOWN.contains(&key.as_str()) {
            errors.push(format!(
                "{path}: schema keyword {key:?} is not supported by this checker"
            ));
        }
    }
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        match resolve(root, r) {
            Some(target) => check(root, target, v, path, errors),
            None => errors.push(format!("{path}: unresolvable $ref {r:?}")),
        }
    }
    if let Some(t) = obj.get("type") {
        let ok = match t {
            Value::String(s) => type_matches(s, v),
            Value::Array(list) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|s| type_matches(s, v)),
            _ => false,
        };
        if !ok {
            errors.push(format!("{path}: expected type {t}, got {v}"));
        }
    }
    if let Some(Value::Array(allowed)) = obj.get("enum") {
        if !allowed.contains(v) {
            errors.push(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(x)) = (obj.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            errors.push(format!("{path}: {x} < minimum {min}"));
        }
    }
    if let Some(not) = obj.get("not") {
        let mut sub = Vec::new();
        check(root, not, v, path, &mut sub);
        if sub.is_empty() {
            errors.push(format!("{path}: must not match {not}"));
        }
    }
    if let Some(map) = v.as_object() {
        if let Some(Value::Array(req)) = obj.get("required") {
            for k in req.iter().filter_map(Value::as_str) {
                if !map.contains_key(k) {
                    errors.push(format!("{path}: missing required key {k:?}"));
                }
            }
        }
        if let Some(Value::Object(deps)) = obj.get("dependentRequired") {
            for (present, needs) in deps {
                if !map.contains_key(present) {
                    continue;
                }
                for k in needs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if !map.contains_key(k) {
                        errors.push(format!("{path}: key {present:?} needs key {k:?}"));
                    }
                }
            }
        }
        let props = obj.get("properties").and_then(Value::as_object);
        for (k, child) in map {
            let child_path = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(root, s, child, &child_path, errors),
                None => {
                    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
                        errors.push(format!("{path}: key {k:?} is not allowed"));
                    }
                }
            }
        }
    }
    if let (Some(items), Some(list)) = (obj.get("items"), v.as_array()) {
        for (i, item) in list.iter().enumerate() {
            check(root, items, item, &format!("{path}[{i}]"), errors);
        }
    }
}
