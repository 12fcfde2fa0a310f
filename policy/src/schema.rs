//! OpenAPI v3 schemas of the policy kinds, generated from the model types, for Kubernetes
//! CustomResourceDefinitions.
//!
//! Why generated: a hand-written CRD schema drifts from the serde types the sidecar and the
//! control plane actually read, and then `kubectl apply` accepts a policy the control plane
//! refuses (or the reverse). Here the JSON Schema comes from `schemars` deriving it from the same
//! types (`rename_all`, defaults, required fields and enums follow the serde attributes), and
//! [`structural`] rewrites it into the *structural* subset Kubernetes requires of a CRD:
//!
//! - no `$ref`: definitions are inlined (the model has no recursive types);
//! - every node has a `type`; `Option<T>` (`anyOf [T, null]` or `type: [T, "null"]`) becomes
//!   `T` with `nullable: true`;
//! - enums are a flat `enum` of strings (schemars writes a `oneOf` of `const`s when variants
//!   carry doc comments; those docs move into the description);
//! - no `additionalProperties: false` (forbidden next to `properties` in a structural schema):
//!   unknown fields are refused because no node sets `x-kubernetes-preserve-unknown-fields`, so
//!   the API server prunes them, and with server-side field validation `Strict` (kubectl's
//!   `--validate=strict`, its default) it rejects the object instead;
//! - only formats Kubernetes knows (`uint16` becomes `minimum`/`maximum`).
//!
//! What a schema cannot say (pattern syntax, duplicate names, CIDR host bits, the cross-document
//! checks) stays with [`crate::load`]: the CRD refuses the shape early, `meshgate policy check`
//! and the control plane still judge the meaning.

use schemars::JsonSchema;
use serde_json::{Map, Value};

use crate::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, MeshConfig, MeshConfigSpec, NetworkPolicy,
    NetworkPolicySpec, Resource, Service, ServiceSpec,
};

/// The API group of every policy kind (`apiVersion: meshgate.dev/v1`).
pub const GROUP: &str = "meshgate.dev";

/// The API version within [`GROUP`].
pub const VERSION: &str = "v1";

/// One policy kind as a Kubernetes custom resource.
#[derive(Debug, Clone, PartialEq)]
pub struct KindSchema {
    /// `kind`, e.g. `AuthorizationPolicy`.
    pub kind: &'static str,
    /// The resource's plural (the CRD is named `<plural>.meshgate.dev`).
    pub plural: &'static str,
    /// Short names for kubectl. `Service` and `NetworkPolicy` share their kind with core
    /// Kubernetes kinds, so these (and `<plural>.meshgate.dev`) are how to name ours.
    pub short_names: &'static [&'static str],
    /// The structural schema of `spec`.
    pub spec: Value,
}

impl KindSchema {
    /// `<plural>.meshgate.dev`, the CRD's name.
    pub fn crd_name(&self) -> String {
        format!("{}.{GROUP}", self.plural)
    }

    /// The lowercase singular, e.g. `authorizationpolicy`.
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }

    /// The `openAPIV3Schema` of the whole document: `apiVersion`, `kind`, `metadata` (validated
    /// by the API server itself, so only `type: object` here) and the required `spec`.
    pub fn document(&self) -> Value {
        serde_json::json!({
            "type": "object",
            "description": format!("meshgate {} (see docs/policy.md); validated again by `meshgate policy check` and the control plane.", self.kind),
            "required": ["spec"],
            "properties": {
                "apiVersion": { "type": "string" },
                "kind": { "type": "string" },
                "metadata": { "type": "object" },
                "spec": self.spec,
            }
        })
    }
}

/// Why a generated schema could not be made structural. A bug in the model's annotations, not
/// a user error: the message names the construct so the model can be fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind}: cannot turn the generated schema into a Kubernetes structural schema at {at}: {reason}; annotate the model type with #[schemars(...)] so it generates a plain type"
)]
pub struct SchemaError {
    pub kind: String,
    pub at: String,
    pub reason: String,
}

/// Every policy kind with its structural `spec` schema, in a fixed order.
pub fn kinds() -> Result<Vec<KindSchema>, SchemaError> {
    Ok(vec![
        kind::<AuthorizationPolicy, AuthorizationPolicySpec>(
            "authorizationpolicies",
            &["mgauthz"],
        )?,
        kind::<Service, ServiceSpec>("services", &["mgsvc"])?,
        kind::<NetworkPolicy, NetworkPolicySpec>("networkpolicies", &["mgnetpol"])?,
        kind::<MeshConfig, MeshConfigSpec>("meshconfigs", &["mgconfig"])?,
    ])
}

fn kind<R: Resource<Spec = S>, S: JsonSchema>(
    plural: &'static str,
    short_names: &'static [&'static str],
) -> Result<KindSchema, SchemaError> {
    let generated = schemars::SchemaGenerator::default().into_root_schema_for::<S>();
    let spec = structural(R::KIND, generated.as_value())?;
    Ok(KindSchema {
        kind: R::KIND,
        plural,
        short_names,
        spec,
    })
}

/// Rewrites a schemars root schema (with `$defs`) into a Kubernetes structural schema.
pub fn structural(kind: &str, root: &Value) -> Result<Value, SchemaError> {
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let converter = Converter { kind, defs: &defs };
    converter.node(root, "spec", 0)
}

/// Formats the API server understands for the JSON types we emit; others are dropped.
const KNOWN_FORMATS: [&str; 4] = ["int32", "int64", "float", "double"];

struct Converter<'a> {
    kind: &'a str,
    defs: &'a Map<String, Value>,
}

impl Converter<'_> {
    fn fail(&self, at: &str, reason: impl Into<String>) -> SchemaError {
        SchemaError {
            kind: self.kind.to_string(),
            at: at.to_string(),
            reason: reason.into(),
        }
    }

    /// The schema `$ref` points at, or the schema itself.
    fn resolve<'v>(&'v self, schema: &'v Value, at: &str) -> Result<&'v Value, SchemaError> {
        match schema.get("$ref").and_then(Value::as_str) {
            None => Ok(schema),
            Some(r) => {
                let name = r
                    .strip_prefix("#/$defs/")
                    .ok_or_else(|| self.fail(at, format!("$ref {r} outside #/$defs")))?;
                self.defs
                    .get(name)
                    .ok_or_else(|| self.fail(at, format!("$ref {r} has no definition")))
            }
        }
    }

    fn node(&self, schema: &Value, at: &str, depth: usize) -> Result<Value, SchemaError> {
        if depth > 32 {
            return Err(self.fail(at, "nesting deeper than 32 (a recursive type?)"));
        }
        let own = schema
            .as_object()
            .ok_or_else(|| self.fail(at, "a schema that is not an object (`true`/`false`)"))?;
        let target = self.resolve(schema, at)?;
        let mut out = Map::new();
        // A description next to a $ref (a field's doc comment) wins over the type's own.
        if let Some(d) = own.get("description").or_else(|| target.get("description")) {
            out.insert("description".into(), d.clone());
        }
        if let Some(default) = own.get("default").filter(|d| !d.is_null()) {
            out.insert("default".into(), default.clone());
        }
        let target = target
            .as_object()
            .ok_or_else(|| self.fail(at, "a definition that is not an object"))?;

        // Option<T>: `anyOf: [T, {type: null}]`.
        for key in ["anyOf", "oneOf"] {
            let Some(branches) = target.get(key).and_then(Value::as_array) else {
                continue;
            };
            let (nulls, others): (Vec<&Value>, Vec<&Value>) = branches
                .iter()
                .partition(|b| b.get("type").and_then(Value::as_str) == Some("null"));
            if let Some(values) = self.string_enum(&others, at)? {
                out.insert("type".into(), "string".into());
                out.insert("enum".into(), Value::Array(values.0));
                if !values.1.is_empty() {
                    let base = out
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let joined = values.1.join(" ");
                    let text = if base.is_empty() {
                        joined
                    } else {
                        format!("{base} {joined}")
                    };
                    out.insert("description".into(), text.into());
                }
            } else if others.len() == 1 {
                let inner = self.node(others[0], at, depth + 1)?;
                for (k, v) in inner.as_object().expect("node returns objects") {
                    // The field's own description stays.
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
            } else {
                return Err(self.fail(at, format!("{key} with {} branches", others.len())));
            }
            if !nulls.is_empty() {
                out.insert("nullable".into(), true.into());
            }
            return Ok(Value::Object(out));
        }
        if target.contains_key("allOf") || target.contains_key("not") {
            return Err(self.fail(at, "allOf/not"));
        }

        let (ty, nullable) = match target.get("type") {
            Some(Value::String(t)) => (t.clone(), false),
            Some(Value::Array(types)) => {
                let non_null: Vec<&str> = types
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|t| *t != "null")
                    .collect();
                match non_null.as_slice() {
                    [one] => (one.to_string(), non_null.len() < types.len()),
                    _ => return Err(self.fail(at, format!("type {types:?}"))),
                }
            }
            _ if target.contains_key("const") || target.contains_key("enum") => {
                ("string".to_string(), false)
            }
            _ => return Err(self.fail(at, "no type")),
        };
        out.insert("type".into(), ty.clone().into());
        if nullable {
            out.insert("nullable".into(), true.into());
        }
        match ty.as_str() {
            "object" => {
                if let Some(props) = target.get("properties").and_then(Value::as_object) {
                    let mut converted = Map::new();
                    for (name, prop) in props {
                        converted.insert(
                            name.clone(),
                            self.node(prop, &format!("{at}.{name}"), depth + 1)?,
                        );
                    }
                    out.insert("properties".into(), Value::Object(converted));
                }
                if let Some(req) = target
                    .get("required")
                    .filter(|r| r.as_array().is_some_and(|a| !a.is_empty()))
                {
                    out.insert("required".into(), req.clone());
                }
                match target.get("additionalProperties") {
                    // deny_unknown_fields: expressed by the absence of preserve-unknown-fields.
                    None | Some(Value::Bool(false)) => {}
                    Some(_) => return Err(self.fail(at, "a map (additionalProperties)")),
                }
            }
            "array" => {
                let items = target
                    .get("items")
                    .ok_or_else(|| self.fail(at, "an array without items"))?;
                out.insert(
                    "items".into(),
                    self.node(items, &format!("{at}[]"), depth + 1)?,
                );
                for k in ["minItems", "maxItems", "uniqueItems"] {
                    if let Some(v) = target.get(k) {
                        out.insert(k.into(), v.clone());
                    }
                }
            }
            "string" => {
                if let Some(c) = target.get("const") {
                    out.insert("enum".into(), Value::Array(vec![c.clone()]));
                }
                for k in ["enum", "pattern", "minLength", "maxLength"] {
                    if let Some(v) = target.get(k) {
                        out.insert(k.into(), v.clone());
                    }
                }
                self.format(target, &mut out);
            }
            "integer" | "number" => {
                for k in ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"] {
                    if let Some(v) = target.get(k) {
                        out.insert(k.into(), v.clone());
                    }
                }
                match target.get("format").and_then(Value::as_str) {
                    Some("uint16") => {
                        out.entry("minimum").or_insert(0.into());
                        out.insert("maximum".into(), 65535.into());
                    }
                    Some("uint8") => {
                        out.entry("minimum").or_insert(0.into());
                        out.insert("maximum".into(), 255.into());
                    }
                    Some("uint32" | "uint64" | "uint") => {
                        out.entry("minimum").or_insert(0.into());
                    }
                    _ => self.format(target, &mut out),
                }
            }
            "boolean" => {}
            other => return Err(self.fail(at, format!("type {other}"))),
        }
        Ok(Value::Object(out))
    }

    fn format(&self, target: &Map<String, Value>, out: &mut Map<String, Value>) {
        if let Some(f) = target
            .get("format")
            .and_then(Value::as_str)
            .filter(|f| KNOWN_FORMATS.contains(f))
        {
            out.insert("format".into(), f.into());
        }
    }

    /// When every branch is a string constant (or a string enum): the values, and the variants'
    /// doc comments as `VALUE: doc` sentences.
    #[allow(clippy::type_complexity)]
    fn string_enum(
        &self,
        branches: &[&Value],
        at: &str,
    ) -> Result<Option<(Vec<Value>, Vec<String>)>, SchemaError> {
        let mut values = Vec::new();
        let mut docs = Vec::new();
        for b in branches {
            let b = self.resolve(b, at)?;
            if let Some(c) = b.get("const").filter(|c| c.is_string()) {
                values.push(c.clone());
                if let Some(d) = b.get("description").and_then(Value::as_str) {
                    docs.push(format!("{}: {d}", c.as_str().unwrap_or_default()));
                }
            } else if let Some(e) = b.get("enum").and_then(Value::as_array)
                && e.iter().all(Value::is_string)
            {
                values.extend(e.iter().cloned());
            } else {
                return Ok(None);
            }
        }
        Ok((!values.is_empty()).then_some((values, docs)))
    }
}
