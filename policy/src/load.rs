//! Loading and validating policy-as-code directories.
//!
//! A directory is accepted or refused as a whole: the control plane keeps serving its last good
//! set when any document is wrong, so a half-applied change can never open or close traffic by
//! surprise. All errors are collected (not just the first) and reported as `file:line: reason`,
//! the line being that of the offending field where it can be found, else of the document start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::docsplit::{RawDoc, split_documents};
use crate::model::{
    API_VERSION, AuthorizationPolicy, MeshConfig, NetworkPolicy, Resource, Service,
};
pub use crate::set::PolicySet;
use crate::validate::{self, Problem};

/// Largest policy file read: 4 MiB. Thousands of policies fit in one file under it; a larger file
/// is a generated dump or an attack, and parsing it would cost the control plane (and every
/// sidecar reading files) a multiple of its size in memory.
pub const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Largest total of YAML in one policy directory: 8 MiB. Pushes carry at most this set in JSON,
/// which stays under the 16 MiB push limit of the control-plane stream (`meshgate_xds::wire`).
pub const MAX_POLICY_DIR_BYTES: u64 = 8 * 1024 * 1024;

// A file the per-file limit allows must fit the directory (and `meshgate-xds` checks that a
// directory's JSON fits a push).
const _: () = assert!(MAX_POLICY_FILE_BYTES <= MAX_POLICY_DIR_BYTES);

/// One problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem concerns the whole file (e.g. it cannot be read).
    pub line: usize,
    pub reason: String,
}

/// `file:line: reason`, or `file: reason` for a problem with the whole file or directory.
impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.reason),
            line => write!(f, "{}:{line}: {}", self.file.display(), self.reason),
        }
    }
}

/// All problems found (the directory is refused as a whole).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(ValidationError::to_string).collect::<Vec<_>>().join("\n"))]
pub struct LoadErrors(pub Vec<ValidationError>);

/// Loads every `*.yaml`/`*.yml` file under `dir` (recursively, in sorted path order).
///
/// Entries whose name starts with `.` are skipped (`.git`, editor files, and the `..data`
/// indirection of Kubernetes ConfigMap mounts, which would otherwise load every file twice), and
/// symlinked directories are not followed (no loops); symlinked files are read.
pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadErrors> {
    let mut files = Vec::new();
    let mut loader = Loader::default();
    if let Err(e) = collect_yaml_files(dir, &mut files) {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "policy directory does not exist; create it or point to another one".to_string()
            }
            std::io::ErrorKind::NotADirectory => {
                "is a file, not a policy directory; give the directory that holds it".to_string()
            }
            _ => format!("cannot read policy directory: {e}"),
        };
        loader.error(dir, 0, reason);
        return Err(LoadErrors(loader.errors));
    }
    files.sort();
    // Sizes first, so an oversize directory is refused before any of it is read.
    let mut total = 0u64;
    for file in &files {
        total += std::fs::metadata(file).map_or(0, |m| m.len());
    }
    if total > MAX_POLICY_DIR_BYTES {
        loader.error(
            dir,
            0,
            format!(
                "the policy directory holds {} of YAML, more than the {} limit; serve fewer or smaller documents (one control plane per cluster or namespace group)",
                mib(total),
                mib(MAX_POLICY_DIR_BYTES)
            ),
        );
        return Err(LoadErrors(loader.errors));
    }
    for file in &files {
        loader.parse_file(file);
    }
    loader.finish()
}

/// `n` bytes in MiB, for messages ("4 MiB", "50.3 MiB").
fn mib(n: u64) -> String {
    let m = n as f64 / (1024.0 * 1024.0);
    if m.fract() == 0.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

/// Reads a policy file, refusing one above [`MAX_POLICY_FILE_BYTES`] without reading it whole
/// (the size is checked again while reading, in case the file grows meanwhile).
fn read_policy_file(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let too_large = |len: u64| {
        format!(
            "policy file is {}, larger than the {} limit; split it into several files (each document can live in its own file)",
            mib(len),
            mib(MAX_POLICY_FILE_BYTES)
        )
    };
    let f = std::fs::File::open(file).map_err(|e| format!("cannot read file: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read file: {e}"))?
        .len();
    if len > MAX_POLICY_FILE_BYTES {
        return Err(too_large(len));
    }
    let mut text = String::new();
    f.take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if text.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

/// Loads `text` as if it were the only file of a policy directory, reporting errors against
/// `file` (which is not read). The same path as [`load_dir`] minus the file system: for callers
/// that already hold the text (and the fuzz target `policy_load`).
pub fn load_text(file: &Path, text: &str) -> Result<PolicySet, LoadErrors> {
    let mut loader = Loader::default();
    loader.parse_text(file, text);
    loader.finish()
}

/// Parses one file's documents into `set` (used for `--services FILE` too). On error `set` is
/// left unchanged.
pub fn parse_file(path: &Path, set: &mut PolicySet) -> Result<(), LoadErrors> {
    let mut loader = Loader::seeded_from(set);
    loader.parse_file(path);
    let new = loader.finish()?;
    if let Some(mc) = new.mesh_config_loaded() {
        set.mesh_config = mc;
    }
    set.policies.extend(new.policies);
    set.services.extend(new.services);
    set.network_policies.extend(new.network_policies);
    set.update_version();
    Ok(())
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect_yaml_files(&path, out)?;
        } else if (file_type.is_file() || file_type.is_symlink() && path.is_file())
            && matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Where a document was read, for "already defined at" messages.
#[derive(Debug, Clone)]
struct Origin(Option<(PathBuf, usize)>);

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((file, line)) => write!(f, "{}:{line}", file.display()),
            None => f.write_str("a previously loaded file"),
        }
    }
}

/// Only `apiVersion` and `kind`, read first to pick the document's type.
#[derive(serde::Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// State across the documents of one load: what was read, what was seen, what went wrong.
#[derive(Default)]
struct Loader {
    set: PolicySet,
    /// (kind, namespace/name) → where it was first defined.
    seen: HashMap<(&'static str, String), Origin>,
    mesh_config_at: Option<Origin>,
    /// Policy `namespace/name` → the file line of each of its rules (block style only).
    rule_lines: HashMap<String, Vec<usize>>,
    errors: Vec<ValidationError>,
}

/// How [`Loader`] files a parsed resource into the set.
trait Collect: Resource + DeserializeOwned {
    fn check(&self) -> Vec<Problem>;
    fn file_into(self, loader: &mut Loader, file: &Path, doc: &RawDoc<'_>);
}

impl PolicySet {
    /// The MeshConfig if one was read (the default otherwise is implicit).
    fn mesh_config_loaded(&self) -> Option<MeshConfig> {
        (self.mesh_config != MeshConfig::default()).then(|| self.mesh_config.clone())
    }
}

impl Loader {
    /// A loader that knows what `set` already holds, to refuse duplicates of it.
    fn seeded_from(set: &PolicySet) -> Self {
        let mut loader = Self::default();
        let earlier = || Origin(None);
        for p in &set.policies {
            loader
                .seen
                .insert((AuthorizationPolicy::KIND, p.metadata.key()), earlier());
        }
        for s in &set.services {
            loader
                .seen
                .insert((Service::KIND, s.metadata.key()), earlier());
        }
        for n in &set.network_policies {
            loader
                .seen
                .insert((NetworkPolicy::KIND, n.metadata.key()), earlier());
        }
        if set.mesh_config_loaded().is_some() {
            loader.mesh_config_at = Some(earlier());
        }
        loader
    }

    fn error(&mut self, file: &Path, line: usize, reason: String) {
        self.errors.push(ValidationError {
            file: file.to_path_buf(),
            line,
            reason,
        });
    }

    /// Checks that need several documents: L7 conditions (methods, paths, headers) on traffic a
    /// Service declares opaque TCP can never match — Istio drops such rules silently; we refuse
    /// them with a reason.
    fn cross_check(&mut self) {
        use crate::model::Protocol;
        let mut problems = Vec::new();
        for policy in &self.set.policies {
            let origin = self
                .seen
                .get(&(AuthorizationPolicy::KIND, policy.metadata.key()))
                .and_then(|o| o.0.clone());
            for service in &self.set.services {
                if !crate::scope::applies_to(policy, &service.spec.identity) {
                    continue;
                }
                let tcp: Vec<u16> = service
                    .spec
                    .ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .map(|p| p.port)
                    .collect();
                let only_tcp = !tcp.is_empty() && tcp.len() == service.spec.ports.len();
                for (index, rule) in policy.spec.rules.iter().enumerate() {
                    let headers = !rule.when.is_empty();
                    for op in &rule.to {
                        let l7 = headers
                            || !op.methods.is_empty()
                            || !op.not_methods.is_empty()
                            || !op.paths.is_empty()
                            || !op.not_paths.is_empty();
                        if !l7 {
                            continue;
                        }
                        let opaque: Vec<u16> = if op.ports.is_empty() {
                            if only_tcp { tcp.clone() } else { Vec::new() }
                        } else {
                            op.ports
                                .iter()
                                .copied()
                                .filter(|p| tcp.contains(p))
                                .collect()
                        };
                        // Point at the rule itself when its line is known.
                        let at_rule = origin.clone().map(|(file, line)| {
                            let rule_line = self
                                .rule_lines
                                .get(&policy.metadata.key())
                                .and_then(|lines| lines.get(index))
                                .copied();
                            (file, rule_line.unwrap_or(line))
                        });
                        for port in opaque {
                            // At L4 an ALLOW's HTTP conditions never hold; a DENY drops them.
                            let effect = if policy.spec.action == crate::model::Action::Deny {
                                "which TCP traffic does not carry: at L4 this DENY would drop them and deny every connection it matches on"
                            } else {
                                "which can never match"
                            };
                            problems.push((
                                at_rule.clone(),
                                format!(
                                    "policy {}: rule {index} has method/path/header conditions, {effect} port {port}: Service {} declares it `protocol: tcp` (opaque). Use a ports-only rule for L4 traffic, or declare the port http",
                                    policy.metadata.key(),
                                    service.metadata.key()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        for (origin, reason) in problems {
            let (file, line) = origin.unwrap_or_else(|| (PathBuf::from("(policy set)"), 0));
            self.error(&file, line, reason);
        }
    }

    fn finish(mut self) -> Result<PolicySet, LoadErrors> {
        self.cross_check();
        if !self.errors.is_empty() {
            return Err(LoadErrors(self.errors));
        }
        self.set.update_version();
        Ok(self.set)
    }

    fn parse_file(&mut self, file: &Path) {
        let text = match read_policy_file(file) {
            Ok(t) => t,
            Err(reason) => return self.error(file, 0, reason),
        };
        self.parse_text(file, &text);
    }

    fn parse_text(&mut self, file: &Path, text: &str) {
        // YAML reads a lone CR as a line break; editors, diffs, `sed -n Np` and the document
        // splitter do not, so every line number after one would be wrong (and text after it can
        // hide from a reviewer's terminal). CRLF is fine.
        if let Some(line) = bare_cr_line(text) {
            let reason = "carriage return without a line feed: use LF or CRLF line endings";
            return self.error(file, line, reason.to_string());
        }
        for doc in split_documents(text) {
            self.parse_doc(file, &doc);
        }
    }

    /// A serde-saphyr error, at its own line when it knows it.
    fn yaml_error(&mut self, file: &Path, doc: &RawDoc<'_>, e: &serde_saphyr::Error) {
        let line = e
            .location()
            .map(|l| usize::try_from(l.line()).unwrap_or(0))
            .filter(|&l| l > 0)
            .map_or(doc.start_line, |l| doc.first_line + l - 1);
        let reason = yaml_reason(e);
        self.error(file, line, reason);
    }

    fn parse_doc(&mut self, file: &Path, doc: &RawDoc<'_>) {
        let header: Header = match serde_saphyr::from_str_with_options(doc.text, yaml_options()) {
            Ok(h) => h,
            Err(e) => return self.yaml_error(file, doc, &e),
        };
        match header.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                let line = doc.line_of("apiVersion");
                let reason = format!("unsupported apiVersion {other:?}: expected {API_VERSION:?}");
                return self.error(file, line, reason);
            }
            None => {
                let reason = format!("document has no apiVersion (expected {API_VERSION:?})");
                return self.error(file, doc.start_line, reason);
            }
        }
        match header.kind.as_deref() {
            Some(AuthorizationPolicy::KIND) => self.typed::<AuthorizationPolicy>(file, doc),
            Some(Service::KIND) => self.typed::<Service>(file, doc),
            Some(NetworkPolicy::KIND) => self.typed::<NetworkPolicy>(file, doc),
            Some(MeshConfig::KIND) => self.typed::<MeshConfig>(file, doc),
            Some(other) => {
                let line = doc.line_of("kind");
                let reason = format!(
                    "unknown kind {other:?}: expected AuthorizationPolicy, Service, \
                     NetworkPolicy or MeshConfig"
                );
                self.error(file, line, reason);
            }
            None => self.error(file, doc.start_line, "document has no kind".to_string()),
        }
    }

    fn typed<R: Collect>(&mut self, file: &Path, doc: &RawDoc<'_>) {
        let resource: R = match serde_saphyr::from_str_with_options(doc.text, yaml_options()) {
            Ok(r) => r,
            Err(e) => return self.yaml_error(file, doc, &e),
        };
        for problem in resource.check() {
            let line = problem
                .near
                .as_deref()
                .map_or(doc.start_line, |n| doc.line_of(n));
            self.error(file, line, problem.reason);
        }
        resource.file_into(self, file, doc);
    }

    /// Records a namespaced resource, refusing a second one with the same `namespace/name`.
    fn check_unique<R: Resource>(&mut self, r: &R, file: &Path, doc: &RawDoc<'_>) {
        let key = r.metadata().key();
        let here = Origin(Some((file.to_path_buf(), doc.start_line)));
        if let Some(first) = self.seen.get(&(R::KIND, key.clone())) {
            let reason = format!("duplicate {} {key:?}: already defined at {first}", R::KIND);
            let line = doc.line_of("name");
            self.error(file, line, reason);
        } else {
            self.seen.insert((R::KIND, key), here);
        }
    }
}

impl Collect for AuthorizationPolicy {
    fn check(&self) -> Vec<Problem> {
        validate::authorization_policy(self)
    }
    fn file_into(self, loader: &mut Loader, file: &Path, doc: &RawDoc<'_>) {
        loader.check_unique(&self, file, doc);
        loader
            .rule_lines
            .insert(self.metadata.key(), doc.rule_lines());
        loader.set.policies.push(self);
    }
}

impl Collect for Service {
    fn check(&self) -> Vec<Problem> {
        validate::service(self)
    }
    fn file_into(self, loader: &mut Loader, file: &Path, doc: &RawDoc<'_>) {
        loader.check_unique(&self, file, doc);
        loader.set.services.push(self);
    }
}

impl Collect for NetworkPolicy {
    fn check(&self) -> Vec<Problem> {
        validate::network_policy(self)
    }
    fn file_into(self, loader: &mut Loader, file: &Path, doc: &RawDoc<'_>) {
        loader.check_unique(&self, file, doc);
        loader.set.network_policies.push(self);
    }
}

impl Collect for MeshConfig {
    fn check(&self) -> Vec<Problem> {
        validate::mesh_config(self)
    }
    fn file_into(self, loader: &mut Loader, file: &Path, doc: &RawDoc<'_>) {
        if let Some(first) = &loader.mesh_config_at {
            let reason = format!("more than one MeshConfig: the first is at {first}");
            loader.error(file, doc.start_line, reason);
            return;
        }
        loader.mesh_config_at = Some(Origin(Some((file.to_path_buf(), doc.start_line))));
        loader.set.mesh_config = self;
    }
}

/// The 1-based line (counting LF) of the first CR that is not followed by LF.
fn bare_cr_line(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let at = (0..bytes.len()).find(|&i| bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n'))?;
    Some(1 + bytes[..at].iter().filter(|&&b| b == b'\n').count())
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { with_snippet: false }
}

/// serde-saphyr's message without its own (document-relative) position, which would contradict
/// the file line we report.
fn yaml_reason(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    // The message alone: the line is reported separately (`file:line:`), and the renderer's
    // location suffix would repeat it. Control characters never reach a terminal.
    serde_saphyr::DefaultMessageFormatter
        .format_message(e.without_snippet())
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
