//! Format-preserving output: a changed document is rewritten entry by entry, and every mapping
//! entry that inject did not change is copied from the source text byte for byte (comments, blank
//! lines, indentation and quoting included). Only changed and new entries are emitted by `yaml`.
//!
//! An entry's text runs from its key line to the next entry's, and owns the comment and blank
//! lines above its key (comment lines only when indented no deeper than the key, so a `#` line
//! inside a literal block is never taken for a comment). A changed entry whose value is a block
//! mapping keeps its key line and is spliced the same way, one level down.
//!
//! What is re-emitted whole instead (see [`yaml::Layout`]): flow-style mappings (`{a: 1}`),
//! mappings with an anchor, a tag or a `<<` merge key, keys that are not alone at the start of
//! their line, duplicate keys, and an unchanged entry that uses an alias whose anchor is not in
//! text copied before it (the anchor's text would be gone). The caller re-reads the result and
//! falls back to re-emitting the whole document unless it holds exactly the data of the
//! re-emitted one ([`yaml::same_data`]), so a case this misjudges costs formatting, not data.

use crate::yaml::{self, Layout, Located, Node, Pos};

/// The document `new` (an edit of `old`, which was parsed from `source` with `located`) as text
/// that copies every unchanged entry from `source`. `None` when the top level has no layout.
pub fn splice(source: &str, old: &Node, new: &Node, located: &Located) -> Option<String> {
    let layout = located.layout.as_ref()?;
    if !matches!(new, Node::Map(_)) {
        return None;
    }
    let lines: Vec<&str> = source.split_inclusive('\n').collect();
    let mut s = Splicer {
        lines: &lines,
        aliases: &located.aliases,
        step: indent_step(layout),
        crlf: source.contains("\r\n"),
        out: String::with_capacity(source.len() * 2),
        copied: Vec::new(),
    };
    s.map(old, new, layout, 0, lines.len());
    Some(s.out)
}

/// How far the file indents a nested mapping (2 when it has none).
fn indent_step(top: &Layout) -> usize {
    top.entries
        .iter()
        .find_map(|e| e.child.as_ref())
        .map(|c| c.indent.saturating_sub(top.indent))
        .filter(|&step| step > 0)
        .unwrap_or(2)
}

struct Splicer<'a> {
    lines: &'a [&'a str],
    aliases: &'a [(Pos, Pos)],
    step: usize,
    crlf: bool,
    out: String,
    /// Line ranges copied so far (anchors defined there are in the output).
    copied: Vec<(usize, usize)>,
}

impl Splicer<'_> {
    /// Writes mapping `new` whose source (`old`, laid out as `layout`) spans lines `start..end`.
    fn map(&mut self, old: &Node, new: &Node, layout: &Layout, start: usize, end: usize) {
        let n = layout.entries.len();
        // Entry i owns lines lead[i]..lead[i + 1] (the last one up to `trail`); its key is on
        // layout.entries[i].line.
        let mut lead = vec![start];
        for pair in layout.entries.windows(2) {
            lead.push(self.back_over_comments(pair[1].line, pair[0].line + 1, layout.indent));
        }
        let last_key = layout.entries[n - 1].line;
        let trail = self.back_over_comments(end, last_key + 1, layout.indent);
        lead.push(trail);
        // Files that put a blank line between entries get one before each added entry too.
        let blank_separated = n > 1 && lead[1..n].iter().all(|&l| self.lines[l].trim().is_empty());

        for (k, v) in new.entries() {
            let Some(i) = layout.entries.iter().position(|e| e.key == k.text) else {
                if blank_separated {
                    self.line_break();
                    self.out.push_str(if self.crlf { "\r\n" } else { "\n" });
                }
                self.emit(k, v, layout.indent);
                continue;
            };
            let e = &layout.entries[i];
            let (key_line, entry_end) = (e.line, lead[i + 1]);
            self.copy(lead[i], key_line);
            let before = old.get(&k.text);
            if before == Some(v) && self.aliases_resolve(key_line, entry_end) {
                self.copy(key_line, entry_end);
                self.copied.push((key_line, entry_end));
                continue;
            }
            match (&e.child, before, v) {
                (Some(child), Some(before @ Node::Map(_)), Node::Map(_))
                    if self.key_line_alone(key_line, e.key_end) =>
                {
                    self.copy(key_line, key_line + 1);
                    self.map(before, v, child, key_line + 1, entry_end);
                }
                // A block sequence whose items inject edited in place (a container's probes) or
                // put in front (init containers): each item is spliced like a mapping, so the
                // comments and untouched fields inside the others stay as they were.
                (_, Some(Node::Seq(old_items)), Node::Seq(new_items))
                    if e.items.as_ref().is_some_and(|i| i.len() == old_items.len())
                        && (new_items.len() == old_items.len()
                            || new_items.ends_with(old_items))
                        && self.key_line_alone(key_line, e.key_end)
                        && self.aliases_resolve(key_line, entry_end) =>
                {
                    let items = e.items.as_ref().expect("checked in the guard");
                    self.items(k, old_items, new_items, items, key_line, entry_end);
                }
                // A block sequence that only gained items at its end (a Service's new port):
                // its source is kept, comments included, and the new items follow it.
                (_, Some(Node::Seq(old_items)), Node::Seq(new_items))
                    if new_items.len() > old_items.len()
                        && new_items[..old_items.len()] == old_items[..]
                        && self.key_line_alone(key_line, e.key_end)
                        && self.aliases_resolve(key_line, entry_end) =>
                {
                    match self.dash_column(key_line + 1, entry_end) {
                        Some(column) => {
                            self.copy(key_line, entry_end);
                            self.copied.push((key_line, entry_end));
                            self.append_items(k, &new_items[old_items.len()..], column);
                        }
                        None => self.emit(k, v, layout.indent),
                    }
                }
                _ => self.emit(k, v, layout.indent),
            }
        }
        self.copy(trail, end);
    }

    /// The first line of the comment and blank lines right above `line` (not above `floor`);
    /// comments count only when indented no deeper than `indent`.
    fn back_over_comments(&self, line: usize, floor: usize, indent: usize) -> usize {
        let mut first = line;
        while first > floor {
            let text = self.lines[first - 1].trim_end_matches(['\n', '\r']);
            let spaces = text.len() - text.trim_start_matches(' ').len();
            let blank = text.trim().is_empty();
            let comment = text[spaces..].starts_with('#') && spaces <= indent;
            if !(blank || comment) {
                break;
            }
            first -= 1;
        }
        first
    }

    /// Whether only a comment follows `key:` on the key's line (so its value starts below it and
    /// the line can be kept while the value is rewritten).
    fn key_line_alone(&self, line: usize, key_end: usize) -> bool {
        let text: String = self.lines[line].chars().skip(key_end).collect();
        let Some(rest) = text.trim_start_matches([' ', '\t']).strip_prefix(':') else {
            return false;
        };
        let rest = rest.trim();
        rest.is_empty() || rest.starts_with('#')
    }

    /// Whether every alias in lines `start..end` refers to an anchor that the output already holds
    /// (copied before) or that these lines define before it.
    fn aliases_resolve(&self, start: usize, end: usize) -> bool {
        self.aliases
            .iter()
            .filter(|(alias, _)| (start..end).contains(&alias.0))
            .all(|&(alias, def)| {
                ((start..end).contains(&def.0) && def < alias)
                    || self.copied.iter().any(|&(a, b)| (a..b).contains(&def.0))
            })
    }

    /// Writes the sequence entry `k` (key on `key_line`, up to `end`) whose items are laid out
    /// as `items`: items put in front are emitted, unchanged items copied, changed mappings
    /// spliced entry by entry when their first entry (on the dash line) is unchanged, and any
    /// other changed item emitted alone.
    fn items(
        &mut self,
        k: &yaml::Scalar,
        old_items: &[Node],
        new_items: &[Node],
        items: &[yaml::ItemLayout],
        key_line: usize,
        end: usize,
    ) {
        self.copy(key_line, items[0].line);
        let dash = items[0].dash;
        let added = new_items.len() - old_items.len();
        if added > 0 {
            self.append_items(k, &new_items[..added], dash);
        }
        for (j, item) in items.iter().enumerate() {
            let item_end = items.get(j + 1).map_or(end, |next| next.line);
            let (old, new) = (&old_items[j], &new_items[added + j]);
            if old == new {
                self.copy(item.line, item_end);
                continue;
            }
            match (&item.layout, old, new) {
                (Some(layout), Node::Map(_), Node::Map(_))
                    if first_entry_kept(layout, old, new) =>
                {
                    self.map(old, new, layout, item.line, item_end);
                }
                _ => {
                    let trail = self.back_over_comments(item_end, item.line + 1, item.dash);
                    self.append_items(k, std::slice::from_ref(new), item.dash);
                    self.copy(trail, item_end);
                }
            }
        }
    }

    /// The column of the first block-sequence dash in lines `start..end`.
    fn dash_column(&self, start: usize, end: usize) -> Option<usize> {
        self.lines[start..end].iter().find_map(|line| {
            let text = line.trim_end_matches(['\n', '\r']);
            let rest = text.trim_start_matches(' ');
            (rest == "-" || rest.starts_with("- ")).then(|| text.len() - rest.len())
        })
    }

    /// Emits sequence items so their dashes sit at `column`, as the source's items do.
    fn append_items(&mut self, k: &yaml::Scalar, items: &[Node], column: usize) {
        let text = yaml::emit_entry(k, &Node::Seq(items.to_vec()), 0, self.step);
        let mut lines = text.split_inclusive('\n').skip(1).peekable();
        let emitted = lines
            .peek()
            .map_or(0, |l| l.len() - l.trim_start_matches(' ').len());
        for line in lines {
            let spaces = line.len() - line.trim_start_matches(' ').len();
            let line = &line[spaces.min(emitted)..];
            self.line_break();
            self.out.push_str(&" ".repeat(column));
            if self.crlf {
                self.out.push_str(&line.replace('\n', "\r\n"));
            } else {
                self.out.push_str(line);
            }
        }
    }

    fn copy(&mut self, start: usize, end: usize) {
        for line in &self.lines[start..end] {
            self.line_break();
            self.out.push_str(line);
        }
    }

    /// Ends the output's last line if it has no line break (the source's last line may lack one),
    /// so the next text does not run into it.
    fn line_break(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push_str(if self.crlf { "\r\n" } else { "\n" });
        }
    }

    fn emit(&mut self, k: &yaml::Scalar, v: &Node, indent: usize) {
        self.line_break();
        let text = yaml::emit_entry(k, v, indent, self.step);
        if self.crlf {
            self.out.push_str(&text.replace('\n', "\r\n"));
        } else {
            self.out.push_str(&text);
        }
    }
}

/// Whether a sequence item's first entry — the one on its dash line — is still its first entry,
/// unchanged, so splicing the item copies the dash with it.
fn first_entry_kept(layout: &yaml::Layout, old: &Node, new: &Node) -> bool {
    let Some(first) = layout.entries.first() else {
        return false;
    };
    new.entries()
        .first()
        .is_some_and(|(k, v)| k.text == first.key && old.get(&first.key) == Some(v))
}
