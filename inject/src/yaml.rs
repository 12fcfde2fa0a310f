//! A small ordered YAML tree for round-tripping manifests.
//!
//! Why not deserialize into `serde_json::Value`: its map sorts keys (the user's order would be lost)
//! and typed scalars lose their spelling (`0644` would come back as `644`, `"8080"` vs `8080`
//! must stay distinct). So we read serde-saphyr's parser events (`granit_parser`) into a tree that
//! keeps key order and each scalar's source text and quoting, and emit it with a tiny block-style
//! emitter. Anchors and aliases are expanded and `<<` merge keys resolved, so the tree is plain data;
//! comments are not kept in the tree. [`parse_located`] also records where each entry of a block
//! mapping sits in the source ([`Layout`]), so `verbatim` can copy the entries inject leaves alone
//! byte for byte instead of re-emitting them.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span, StructureStyle, Tag};

/// How a scalar is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Written exactly as read, unquoted: its YAML type (number, bool, null, string) is the reader's
    /// to resolve, as it was in the source. Also used for numbers and booleans we create.
    Plain,
    /// A string that was double-quoted in the source: written double-quoted again (or as a
    /// literal block when it has line breaks), so it stays a string.
    Quoted,
    /// A string that was single-quoted in the source: written single-quoted again when it can be.
    SingleQuoted,
    /// A string: plain when that reads back as the same string, else quoted or a literal block.
    Auto,
}

/// A scalar's text and how it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar {
    /// The value after YAML escape processing.
    pub text: String,
    /// How to write it back.
    pub style: Style,
}

/// A YAML node: scalar, sequence or mapping (mapping entries in source order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A scalar.
    Scalar(Scalar),
    /// A sequence.
    Seq(Vec<Node>),
    /// A sequence that was written in flow style (`[a, b]`) in the source. Same data as
    /// [`Node::Seq`]; kept apart only so it is written back the same way when its items are scalars.
    Flow(Vec<Node>),
    /// A mapping with scalar keys, in order.
    Map(Vec<(Scalar, Node)>),
}

/// Why a YAML text could not be read into a [`Node`] tree.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// The text is not valid YAML.
    #[error("{0}")]
    Syntax(String),
    /// Valid YAML that this tree cannot represent faithfully.
    #[error("{0}")]
    Unsupported(String),
}

impl Node {
    /// A string scalar, quoted on output only when it has to be.
    pub fn str(s: impl Into<String>) -> Node {
        Node::Scalar(Scalar {
            text: s.into(),
            style: Style::Auto,
        })
    }

    /// An integer scalar (plain).
    pub fn int(n: impl std::fmt::Display) -> Node {
        Node::Scalar(Scalar {
            text: n.to_string(),
            style: Style::Plain,
        })
    }

    /// A boolean scalar (plain).
    pub fn bool(b: bool) -> Node {
        Node::Scalar(Scalar {
            text: b.to_string(),
            style: Style::Plain,
        })
    }

    /// A sequence of strings.
    pub fn str_seq<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Node {
        Node::Seq(items.into_iter().map(Node::str).collect())
    }

    /// A mapping from `(key, value)` pairs, in order.
    pub fn map<'a>(entries: impl IntoIterator<Item = (&'a str, Node)>) -> Node {
        Node::Map(entries.into_iter().map(|(k, v)| (key(k), v)).collect())
    }

    /// The scalar's text, unless it is a plain null (`~`, `null`, empty).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar(s) if !(s.style == Style::Plain && is_null(&s.text)) => Some(&s.text),
            _ => None,
        }
    }

    /// True for a plain scalar that YAML reads as null.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar(s) if s.style == Style::Plain && is_null(&s.text))
    }

    /// True for a plain `true` (any case).
    pub fn is_true(&self) -> bool {
        matches!(self, Node::Scalar(s) if s.style == Style::Plain && s.text.eq_ignore_ascii_case("true"))
    }

    /// The value under `k` of a mapping.
    pub fn get(&self, k: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(ek, _)| ek.text == k).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value under `k` of a mapping, mutably.
    pub fn get_mut(&mut self, k: &str) -> Option<&mut Node> {
        match self {
            Node::Map(entries) => entries
                .iter_mut()
                .find(|(ek, _)| ek.text == k)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows a path of mapping keys.
    pub fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |n, k| n.get(k))
    }

    /// Sets `k` in a mapping: replaces the value in place (keeping its position) or appends.
    /// Does nothing on a non-mapping.
    pub fn set(&mut self, k: &str, v: Node) {
        if let Node::Map(entries) = self {
            match entries.iter_mut().find(|(ek, _)| ek.text == k) {
                Some((_, old)) => *old = v,
                None => entries.push((key(k), v)),
            }
        }
    }

    /// Replaces the entry `old` of a mapping by `new: v` at the same position (appends when
    /// `old` is missing), so a rewritten key does not move below its siblings.
    pub fn replace_entry(&mut self, old: &str, new: &str, v: Node) {
        if let Node::Map(entries) = self {
            match entries.iter().position(|(ek, _)| ek.text == old) {
                Some(i) => entries[i] = (key(new), v),
                None => entries.push((key(new), v)),
            }
        }
    }

    /// Removes `k` from a mapping and returns its value.
    pub fn remove(&mut self, k: &str) -> Option<Node> {
        match self {
            Node::Map(entries) => {
                let i = entries.iter().position(|(ek, _)| ek.text == k)?;
                Some(entries.remove(i).1)
            }
            _ => None,
        }
    }

    /// The mapping under `k`, created (or replacing a null) when missing.
    pub fn map_entry(&mut self, k: &str) -> &mut Node {
        self.entry_with(k, || Node::Map(Vec::new()))
    }

    /// The sequence under `k`, created (or replacing a null) when missing.
    pub fn seq_entry(&mut self, k: &str) -> &mut Node {
        self.entry_with(k, || Node::Seq(Vec::new()))
    }

    fn entry_with(&mut self, k: &str, make: impl FnOnce() -> Node) -> &mut Node {
        if self.get(k).is_none_or(Node::is_null) {
            self.set(k, make());
        }
        self.get_mut(k).expect("just set")
    }

    /// The sequence's items, mutably (`None` for other nodes).
    pub fn seq_mut(&mut self) -> Option<&mut Vec<Node>> {
        match self {
            Node::Seq(i) | Node::Flow(i) => Some(i),
            _ => None,
        }
    }

    /// The mapping's entries (empty for other nodes).
    pub fn entries(&self) -> &[(Scalar, Node)] {
        match self {
            Node::Map(e) => e,
            _ => &[],
        }
    }

    /// The sequence's items (empty for other nodes).
    pub fn items(&self) -> &[Node] {
        match self {
            Node::Seq(i) | Node::Flow(i) => i,
            _ => &[],
        }
    }
}

/// A mapping key written as a plain-if-possible string.
fn key(k: &str) -> Scalar {
    Scalar {
        text: k.to_owned(),
        style: Style::Auto,
    }
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// A position in the source: 0-based line and 0-based column (in characters).
pub type Pos = (usize, usize);

/// Where the entries of a block mapping are in the source text.
///
/// Recorded only for mappings whose entries can be cut out line by line: block style, no anchor or
/// tag on the mapping, every key a plain or quoted scalar alone at the start of its line, all at
/// one indentation, no duplicate keys and no `<<` merge key. Anything else has no layout, and
/// `verbatim` re-emits it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The column of the keys.
    pub indent: usize,
    /// The entries, in source order.
    pub entries: Vec<EntryLayout>,
}

/// One entry of a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryLayout {
    /// The key's text.
    pub key: String,
    /// The 0-based line of the key.
    pub line: usize,
    /// The column (in characters) just after the key's last character.
    pub key_end: usize,
    /// The layout of the value, when it is a mapping that has one.
    pub child: Option<Layout>,
    /// The items of the value, when it is a block sequence whose every item starts on its own
    /// dash line (`- name: web`): where each starts, and its mapping's layout if it has one.
    pub items: Option<Vec<ItemLayout>>,
}

/// One item of a block sequence in an [`EntryLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemLayout {
    /// The 0-based line of the item's dash.
    pub line: usize,
    /// The column of the dash.
    pub dash: usize,
    /// The layout of the item, when it is a block mapping that has one (its first key sits on
    /// the dash line).
    pub layout: Option<Layout>,
}

/// The source positions of a parsed document: the top-level mapping's layout, and every alias
/// with the position of the anchor it refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// The layout of the document's top-level mapping, if it has one.
    pub layout: Option<Layout>,
    /// `(alias, its anchor's definition)` for every alias in the document.
    pub aliases: Vec<(Pos, Pos)>,
}

/// Parses one YAML document (an empty text gives a null scalar).
pub fn parse(text: &str) -> Result<Node, YamlError> {
    parse_located(text).map(|(node, _)| node)
}

/// Parses one YAML document and records where its mappings' entries are in `text`.
pub fn parse_located(text: &str) -> Result<(Node, Located), YamlError> {
    let mut b = Builder::new(text);
    b.run(text)?;
    let mut docs = b.docs;
    match docs.len() {
        0 => Ok((
            Node::Scalar(Scalar {
                text: String::new(),
                style: Style::Plain,
            }),
            Located::default(),
        )),
        1 => Ok((
            docs.remove(0),
            Located {
                layout: b.doc_layout,
                aliases: b.aliases,
            },
        )),
        n => Err(YamlError::Unsupported(format!(
            "expected one YAML document, found {n}"
        ))),
    }
}

/// A mapping being filled: its node, anchor id, the key waiting for its value, and its layout
/// (`None` once something makes it unfit for line-by-line copying).
struct Open {
    node: Node,
    anchor: usize,
    pending: Option<Scalar>,
    layout: Option<Layout>,
    /// A block sequence's item layouts (`None` once an item does not start on a dash line).
    items: Option<Vec<ItemLayout>>,
    /// Where the item being read started (line, column of its content, dash column).
    item_start: Option<(usize, usize)>,
}

/// Builds nodes from parser events.
struct Builder<'t> {
    /// The source's lines, to check that keys stand alone at the start of theirs.
    lines: Vec<&'t str>,
    /// Open collections.
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    /// Where each anchor was defined.
    anchor_pos: HashMap<usize, Pos>,
    aliases: Vec<(Pos, Pos)>,
    docs: Vec<Node>,
    /// The layout of the (last) document's top-level mapping.
    doc_layout: Option<Layout>,
}

fn pos(span: &Span) -> Pos {
    (span.start.line().saturating_sub(1), span.start.col())
}

impl<'t> Builder<'t> {
    fn new(text: &'t str) -> Self {
        Builder {
            lines: text.split('\n').collect(),
            stack: Vec::new(),
            anchors: HashMap::new(),
            anchor_pos: HashMap::new(),
            aliases: Vec::new(),
            docs: Vec::new(),
            doc_layout: None,
        }
    }

    fn run(&mut self, text: &str) -> Result<(), YamlError> {
        for ev in Parser::new_from_str(text) {
            let (ev, span) = ev.map_err(|e| YamlError::Syntax(e.to_string()))?;
            self.event(ev, &span).map_err(|e| match e {
                YamlError::Unsupported(m) => {
                    YamlError::Unsupported(format!("{m} (line {})", span.start.line()))
                }
                e => e,
            })?;
        }
        Ok(())
    }

    /// Whether the next finished node is a key of the innermost open mapping.
    fn expects_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Open {
                node: Node::Map(_),
                pending: None,
                ..
            })
        )
    }

    /// Records a scalar key's position in the innermost mapping's layout, or drops the layout when
    /// the key cannot be cut out line by line.
    fn record_key(&mut self, key: Option<(&str, ScalarStyle, usize, bool)>, span: &Span) {
        let lines = &self.lines;
        let Some(open) = self.stack.last_mut() else {
            return;
        };
        let Some(layout) = open.layout.as_mut() else {
            return;
        };
        let (line, col) = pos(span);
        // A key stands alone at the start of its line; the first key of a sequence item may
        // follow its dash (`  - name: web`).
        let head: String = lines
            .get(line)
            .map(|l| l.chars().take(col).collect())
            .unwrap_or_default();
        let rest = head.trim_start_matches(' ');
        let alone = rest.is_empty()
            || (layout.entries.is_empty()
                && rest.starts_with('-')
                && rest.len() > 1
                && rest[1..].chars().all(|c| c == ' '));
        let fits = match key {
            Some((text, style, anchor, tagged)) => {
                alone
                    && anchor == 0
                    && !tagged
                    && span.end.line() == span.start.line()
                    && matches!(
                        style,
                        ScalarStyle::Plain | ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted
                    )
                    && !(style == ScalarStyle::Plain && text == "<<")
                    && (layout.entries.is_empty() || layout.indent == col)
                    && !layout.entries.iter().any(|e| e.key == text)
            }
            None => false,
        };
        match key {
            Some((text, ..)) if fits => {
                layout.indent = col;
                layout.entries.push(EntryLayout {
                    key: text.to_owned(),
                    line,
                    key_end: span.end.col(),
                    child: None,
                    items: None,
                });
            }
            _ => open.layout = None,
        }
    }

    fn event(&mut self, ev: Event<'_>, span: &Span) -> Result<(), YamlError> {
        if let Some(id) = ev.anchor_id()
            && ev.is_node()
        {
            self.anchor_pos.insert(id, pos(span));
        }
        // A node that starts right inside a block sequence is one of its items: note where, and
        // whether it stands on a dash line of its own (`  - name: web`).
        if ev.is_node() {
            let lines = &self.lines;
            if let Some(open) = self.stack.last_mut()
                && matches!(open.node, Node::Seq(_))
                && open.items.is_some()
            {
                let (line, col) = pos(span);
                let head: String = lines
                    .get(line)
                    .map(|l| l.chars().take(col).collect())
                    .unwrap_or_default();
                let rest = head.trim_start_matches(' ');
                let dash_alone =
                    rest.starts_with('-') && rest[1..].chars().all(|c| c == ' ') && rest.len() > 1;
                if dash_alone {
                    open.item_start = Some((line, head.len() - rest.len()));
                } else {
                    open.items = None;
                }
            }
        }
        let is_key = self.expects_key();
        if is_key && !matches!(ev, Event::Scalar(..)) && ev.is_node() {
            self.record_key(None, span);
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                check_tag(tag.as_deref())?;
                if is_key {
                    self.record_key(Some((&text, style, anchor, tag.is_some())), span);
                }
                let style = match (style, tag.as_deref()) {
                    (_, Some(t)) if t.is_yaml_core_schema_tag("str") => Style::Quoted,
                    (ScalarStyle::Plain, _) => Style::Plain,
                    (ScalarStyle::SingleQuoted, _) => Style::SingleQuoted,
                    (ScalarStyle::DoubleQuoted, _) => Style::Quoted,
                    (ScalarStyle::Literal | ScalarStyle::Folded, _) => Style::Auto,
                };
                self.finish(
                    Node::Scalar(Scalar {
                        text: text.into_owned(),
                        style,
                    }),
                    anchor,
                )
            }
            Event::SequenceStart(style, anchor, tag) => {
                check_tag(tag.as_deref())?;
                let seq = match style {
                    StructureStyle::Flow => Node::Flow(Vec::new()),
                    StructureStyle::Block => Node::Seq(Vec::new()),
                };
                let items = matches!(seq, Node::Seq(_)).then(Vec::new);
                self.stack.push(Open {
                    node: seq,
                    anchor,
                    pending: None,
                    layout: None,
                    items,
                    item_start: None,
                });
                Ok(())
            }
            Event::MappingStart(style, anchor, tag) => {
                check_tag(tag.as_deref())?;
                let layout =
                    (style == StructureStyle::Block && anchor == 0 && tag.is_none()).then(|| {
                        Layout {
                            indent: 0,
                            entries: Vec::new(),
                        }
                    });
                self.stack.push(Open {
                    node: Node::Map(Vec::new()),
                    anchor,
                    pending: None,
                    layout,
                    items: None,
                    item_start: None,
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.stack.pop().expect("balanced events");
                let node = resolve_merges(open.node)?;
                let layout = open.layout.filter(|l| !l.entries.is_empty());
                let items = open.items.filter(|i| !i.is_empty());
                self.finish_with(node, open.anchor, layout, items)
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| {
                    YamlError::Unsupported("alias to an unknown anchor".to_owned())
                })?;
                if let Some(&def) = self.anchor_pos.get(&id) {
                    self.aliases.push((pos(span), def));
                }
                self.finish(node, 0)
            }
            // Stream/document markers, comments and anchor metadata carry no data.
            _ => Ok(()),
        }
    }

    /// Places a finished node into its parent (or as a document).
    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), YamlError> {
        self.finish_with(node, anchor, None, None)
    }

    /// [`Self::finish`] for a node with the layout of its entries.
    fn finish_with(
        &mut self,
        node: Node,
        anchor: usize,
        layout: Option<Layout>,
        items: Option<Vec<ItemLayout>>,
    ) -> Result<(), YamlError> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(open) = self.stack.last_mut() else {
            self.docs.push(node);
            self.doc_layout = layout;
            return Ok(());
        };
        match (&mut open.node, &mut open.pending) {
            (Node::Seq(seq) | Node::Flow(seq), _) => {
                seq.push(node);
                match (open.items.as_mut(), open.item_start.take()) {
                    (Some(list), Some((line, dash))) => {
                        list.push(ItemLayout { line, dash, layout })
                    }
                    _ => open.items = None,
                }
            }
            (Node::Map(entries), pending) => match pending.take() {
                Some(k) => {
                    entries.push((k, node));
                    if let Some(entry) = open.layout.as_mut().and_then(|l| l.entries.last_mut()) {
                        entry.child = layout;
                        entry.items = items;
                    }
                }
                None => match node {
                    Node::Scalar(k) => *pending = Some(k),
                    _ => {
                        return Err(YamlError::Unsupported(
                            "mapping keys that are not scalars are not supported".to_owned(),
                        ));
                    }
                },
            },
            (Node::Scalar(_), _) => unreachable!("scalars are never open"),
        }
        Ok(())
    }
}

/// Core-schema tags (`!!str`, `!!int`, ...) are fine; others (compose's `!reset`, `!override`)
/// change what the document means in ways the tree cannot keep, so they are refused.
fn check_tag(tag: Option<&Tag>) -> Result<(), YamlError> {
    match tag {
        Some(t) if !t.is_yaml_core_schema() => Err(YamlError::Unsupported(format!(
            "the YAML tag {}{} is not supported by meshgate inject; resolve it first (e.g. `docker compose config`)",
            t.original_handle(),
            t.suffix()
        ))),
        _ => Ok(()),
    }
}

/// Applies `<<` merge keys (YAML 1.1, common in compose files): entries of the merged mappings that
/// the mapping does not set itself are appended, so readers of the tree see every effective key.
fn resolve_merges(node: Node) -> Result<Node, YamlError> {
    let Node::Map(entries) = node else {
        return Ok(node);
    };
    if !entries
        .iter()
        .any(|(k, _)| k.style == Style::Plain && k.text == "<<")
    {
        return Ok(Node::Map(entries));
    }
    // Merged entries take the place of their `<<` key; keys the mapping sets itself win.
    let is_merge = |k: &Scalar| k.style == Style::Plain && k.text == "<<";
    let explicit: Vec<String> = entries
        .iter()
        .filter(|(k, _)| !is_merge(k))
        .map(|(k, _)| k.text.clone())
        .collect();
    let mut own: Vec<(Scalar, Node)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        if !is_merge(&k) {
            own.push((k, v));
            continue;
        }
        let sources = match v {
            Node::Seq(items) | Node::Flow(items) => items,
            other => vec![other],
        };
        for src in sources {
            let Node::Map(src_entries) = src else {
                return Err(YamlError::Unsupported(
                    "`<<` must merge a mapping".to_owned(),
                ));
            };
            for (k, v) in src_entries {
                if !explicit.contains(&k.text) && !own.iter().any(|(ok, _)| ok.text == k.text) {
                    own.push((k, v));
                }
            }
        }
    }
    Ok(Node::Map(own))
}

/// Writes a document in block style, ending with a newline.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    match node {
        Node::Map(e) if !e.is_empty() => emit_map(&mut out, e, 0, false, 2),
        Node::Seq(i) | Node::Flow(i) if !i.is_empty() => emit_seq(&mut out, i, 0, false, 2),
        other => {
            emit_inline(&mut out, other, 0, 2);
            out.push('\n');
        }
    }
    out
}

/// Writes one mapping entry in block style with its key at column `indent`; nested mappings and
/// sequences are indented `step` more than their key (the file's own indentation).
pub fn emit_entry(k: &Scalar, v: &Node, indent: usize, step: usize) -> String {
    let mut out = String::new();
    emit_map(
        &mut out,
        std::slice::from_ref(&(k.clone(), v.clone())),
        indent,
        false,
        step,
    );
    out
}

fn emit_map(
    out: &mut String,
    entries: &[(Scalar, Node)],
    indent: usize,
    first_inline: bool,
    step: usize,
) {
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 || !first_inline {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&scalar_inline(k));
        out.push(':');
        emit_value(out, v, indent, step);
    }
}

fn emit_seq(out: &mut String, items: &[Node], indent: usize, first_inline: bool, step: usize) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 || !first_inline {
            out.push_str(&" ".repeat(indent));
        }
        out.push('-');
        match item {
            Node::Map(e) if !e.is_empty() => {
                out.push(' ');
                emit_map(out, e, indent + 2, true, step);
            }
            Node::Seq(s) | Node::Flow(s) if !s.is_empty() && flow_line(item).is_none() => {
                out.push(' ');
                emit_seq(out, s, indent + 2, true, step);
            }
            other => {
                // An empty plain scalar is a null item written as a bare `-`.
                let bare = matches!(other, Node::Scalar(s) if s.style == Style::Plain && s.text.is_empty());
                if !bare {
                    out.push(' ');
                }
                emit_inline(out, other, indent, step);
                out.push('\n');
            }
        }
    }
}

/// The value after `key:` (at the key's indent).
fn emit_value(out: &mut String, v: &Node, indent: usize, step: usize) {
    match v {
        Node::Map(e) if !e.is_empty() => {
            out.push('\n');
            emit_map(out, e, indent + step, false, step);
        }
        Node::Seq(s) | Node::Flow(s) if !s.is_empty() && flow_line(v).is_none() => {
            out.push('\n');
            emit_seq(out, s, indent + step, false, step);
        }
        Node::Scalar(s) if s.style == Style::Plain && s.text.is_empty() => out.push('\n'),
        other => {
            out.push(' ');
            emit_inline(out, other, indent, step);
            out.push('\n');
        }
    }
}

/// A scalar, `{}` or `[]` on the current line; literal blocks continue at `indent + step`.
fn emit_inline(out: &mut String, node: &Node, indent: usize, step: usize) {
    match node {
        Node::Map(_) => out.push_str("{}"),
        Node::Seq(_) | Node::Flow(_) => {
            out.push_str(&flow_line(node).unwrap_or_else(|| "[]".into()))
        }
        Node::Scalar(s) => match literal_block(&s.text) {
            Some(chomp) if s.style != Style::Plain => {
                out.push('|');
                out.push_str(chomp);
                let body = s.text.strip_suffix('\n').unwrap_or(&s.text);
                for line in body.split('\n') {
                    out.push('\n');
                    if !line.is_empty() {
                        out.push_str(&" ".repeat(indent + step));
                        out.push_str(line);
                    }
                }
            }
            _ => out.push_str(&scalar_inline(s)),
        },
    }
}

/// Whether two trees hold the same data: a flow sequence equals a block one, and scalars compare by
/// text and type — quoted, single-quoted and block scalars are all strings, and a plain scalar
/// equals a string only when it reads back as that string.
pub fn same_data(a: &Node, b: &Node) -> bool {
    match (a, b) {
        (Node::Scalar(x), Node::Scalar(y)) => same_scalar(x, y),
        (Node::Seq(x) | Node::Flow(x), Node::Seq(y) | Node::Flow(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_data(a, b))
        }
        (Node::Map(x), Node::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same_scalar(ka, kb) && same_data(va, vb))
        }
        _ => false,
    }
}

fn same_scalar(x: &Scalar, y: &Scalar) -> bool {
    let (px, py) = (x.style == Style::Plain, y.style == Style::Plain);
    x.text == y.text && (px == py || plain_ok(&x.text))
}

/// A flow sequence of scalars as `[a, b]`, when it was written that way and fits on a line.
fn flow_line(node: &Node) -> Option<String> {
    let Node::Flow(items) = node else { return None };
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Node::Scalar(s) if !s.text.contains('\n') => parts.push(scalar_in_flow(s)),
            _ => return None,
        }
    }
    let line = format!("[{}]", parts.join(", "));
    (line.len() <= 120).then_some(line)
}

/// A scalar inside `[...]`, where `,[]{}` also end a plain scalar.
fn scalar_in_flow(s: &Scalar) -> String {
    let plain = scalar_inline(s);
    let flow_safe = !plain.contains([',', '[', ']', '{', '}']) || plain.starts_with(['"', '\'']);
    if flow_safe {
        plain
    } else {
        double_quoted(&s.text)
    }
}

/// The chomping indicator when `text` is best written as a literal block (`|`), else `None`.
fn literal_block(text: &str) -> Option<&'static str> {
    let simple = text.contains('\n')
        && !text.starts_with([' ', '\t', '\n'])
        && !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t');
    if !simple {
        return None;
    }
    let body = text.trim_end_matches('\n');
    // Trailing spaces right before the final break(s) would be ambiguous to read back; quote those.
    if body.ends_with([' ', '\t']) {
        return None;
    }
    match text.len() - body.len() {
        0 => Some("-"),
        1 => Some(""),
        _ => Some("+"),
    }
}

/// A scalar on one line: plain when safe, else double-quoted.
fn scalar_inline(s: &Scalar) -> String {
    match s.style {
        Style::Plain if !s.text.contains('\n') => s.text.clone(),
        Style::Auto if plain_ok(&s.text) => s.text.clone(),
        // Single quotes read better for JSON and other text full of double quotes.
        Style::Auto if !s.text.contains('\'') && !s.text.chars().any(char::is_control) => {
            format!("'{}'", s.text)
        }
        Style::SingleQuoted if !s.text.chars().any(char::is_control) => {
            format!("'{}'", s.text.replace('\'', "''"))
        }
        _ => double_quoted(&s.text),
    }
}

/// Whether a string can be written unquoted and still read back as that same string.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let lower = s.to_ascii_lowercase();
    // Words YAML 1.1 or 1.2 readers resolve to null or booleans.
    // `<<` is the merge key; `=` is YAML 1.1's value key.
    let reserved = [
        "~", "null", "true", "false", "yes", "no", "on", "off", "y", "n", "<<", "=",
    ];
    let second = s.chars().nth(1);
    let numberish = first.is_ascii_digit()
        || (matches!(first, '+' | '-' | '.') && second.is_some_and(|c| c.is_ascii_digit()))
        || matches!(lower.trim_start_matches(['+', '-']), ".inf" | ".nan");
    let bad_start = "?:,[]{}#&*!|>'\"%@`".contains(first)
        || (first == '-' && second.is_none_or(|c| c == ' '))
        || first.is_whitespace()
        || s.starts_with("---")
        || s.starts_with("...");
    !(reserved.contains(&lower.as_str())
        || numberish
        || bad_start
        || s.ends_with(char::is_whitespace)
        || s.ends_with(':')
        || s.contains(": ")
        || s.contains(" #")
        || s.chars().any(char::is_control))
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(src: &str) -> String {
        emit(&parse(src).unwrap())
    }

    #[test]
    fn keeps_order_and_scalar_spelling() {
        let src = "b: 1\na: '0644'\nc: 0644\nd: \"yes\"\ne: yes\nf: ~\ng:\n";
        let out = roundtrip(src);
        // The parser reports an empty value as `~`.
        assert_eq!(
            out,
            "b: 1\na: '0644'\nc: 0644\nd: \"yes\"\ne: yes\nf: ~\ng: ~\n"
        );
        assert_eq!(roundtrip(&out), out);
    }

    #[test]
    fn nested_block_style() {
        let src = "a:\n  - x\n  - k: v\n    l: [1, 2]\n  - []\nb: {}\n";
        let out = roundtrip(src);
        assert_eq!(out, "a:\n  - x\n  - k: v\n    l: [1, 2]\n  - []\nb: {}\n");
        assert_eq!(parse(&out).unwrap(), parse(src).unwrap());
    }

    #[test]
    fn multiline_strings_become_literal_blocks() {
        let src = "a: |\n  line one\n\n  line two\nb: \"no newline\\nat end\"\n";
        let out = roundtrip(src);
        assert_eq!(
            out,
            "a: |\n  line one\n\n  line two\nb: |-\n  no newline\n  at end\n"
        );
        let n = Node::map([("k", Node::str("x\ny"))]);
        assert_eq!(emit(&n), "k: |-\n  x\n  y\n");
        assert_eq!(
            parse(&emit(&n)).unwrap().get("k").unwrap().as_str(),
            Some("x\ny")
        );
    }

    #[test]
    fn created_strings_are_quoted_only_when_needed() {
        for (s, want) in [
            ("--app", "--app"),
            ("1337", "'1337'"),
            ("no", "'no'"),
            ("127.0.0.1:15001", "'127.0.0.1:15001'"),
            ("it's: 1", "\"it's: 1\""),
            (
                "spiffe://mesh.local/ns/a/sa/b",
                "spiffe://mesh.local/ns/a/sa/b",
            ),
            ("a: b", "'a: b'"),
            ("${X:-/sys}:/host", "${X:-/sys}:/host"),
            ("", "''"),
            ("<<", "'<<'"),
            ("---", "'---'"),
        ] {
            assert_eq!(scalar_inline(&key(s)), want, "{s}");
        }
    }

    #[test]
    fn anchors_and_merges_are_expanded() {
        let src = "x: &c\n  a: 1\n  b: 2\ny:\n  <<: *c\n  b: 3\n";
        let n = parse(src).unwrap();
        assert_eq!(emit(n.get("y").unwrap()), "a: 1\nb: 3\n");
    }

    /// An independent reader (serde-saphyr into JSON values) sees the same data before and after.
    #[test]
    fn emitted_yaml_reads_back_as_the_same_data() {
        let samples = [
            "a: 'x: y'\nb: 'hash # not a comment'\nc: ' leading'\nd: ''\ne: \"tab\\there\"\n",
            "\"quoted key\": 1\n'8080': port\nk: -1\nl: -x\nm: 1.5e3\nn: x\no: 0x1F\np: 2024-01-01\n",
            "s: |\n  #!/bin/sh\n    indented\n  echo \"hi\"\nt: >\n  folded\n  text\nu: |+\n  keep\n\nv: \"a\\nb \\n\"\n",
            "w: [a, 'b, c', \"[x]\", '{y}', '#z', '']\nx: [{a: 1}, [1, 2], []]\ny: {}\nz: ~\n",
            "- 1\n- - nested\n  - seq\n- key: v\n  other: [1]\n- ünïcode: ✓\n",
            "env:\n  - name: X\n    value: \"yes\"\n  - {name: Y, value: 'on'}\n  - name: Z\n    value: !!str 123\n",
        ];
        for src in samples {
            let out = emit(&parse(src).unwrap());
            let a: serde_json::Value = serde_saphyr::from_str(src).unwrap();
            let b: serde_json::Value = serde_saphyr::from_str(&out)
                .unwrap_or_else(|e| panic!("re-read failed: {e}\n{out}"));
            assert_eq!(a, b, "\n--- source:\n{src}\n--- emitted:\n{out}");
            assert_eq!(emit(&parse(&out).unwrap()), out, "not stable:\n{out}");
        }
    }

    #[test]
    fn custom_tags_are_refused() {
        assert!(matches!(
            parse("a: !reset []\n"),
            Err(YamlError::Unsupported(_))
        ));
    }
}
