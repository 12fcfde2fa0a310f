//! Splits a YAML stream into its documents, remembering where each starts.
//!
//! Each document is parsed on its own so that one bad document does not hide the errors of the
//! others (users fix a whole directory in one pass), and so that every error can be reported
//! against the line of the file it comes from. A document marker is a line that is `---`, or
//! starts with `--- ` / `---\t`; YAML forbids such a line inside a scalar, so this split agrees
//! with the parser.

/// One document's text and its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDoc<'a> {
    /// The document's text, including its own `---` line if it had one.
    pub text: &'a str,
    /// 1-based file line of `text`'s first line (add `line - 1` to a line within `text`).
    pub first_line: usize,
    /// 1-based file line of the first line with content (for errors about the whole document).
    pub start_line: usize,
}

impl RawDoc<'_> {
    /// The file line of the first line at or after `start_line` that contains `needle`, so a
    /// problem found after parsing can still point at the field it is about.
    pub fn line_of(&self, needle: &str) -> usize {
        // An empty value can only be found by its quotes.
        let needle = if needle.is_empty() { "\"\"" } else { needle };
        self.text
            .lines()
            .enumerate()
            .skip(self.start_line - self.first_line)
            .find(|(_, l)| l.contains(needle))
            .map_or(self.start_line, |(i, _)| self.first_line + i)
    }
}

impl RawDoc<'_> {
    /// The file line of each item of the block sequence under the first `rules:` key, in order
    /// (empty for a flow-style `rules: [...]` or none), so a problem with rule N can point at it.
    pub fn rule_lines(&self) -> Vec<usize> {
        let indent = |l: &str| l.len() - l.trim_start().len();
        let mut lines = self.text.lines().enumerate();
        let Some((_, key)) = lines.find(|(_, l)| l.trim_start().starts_with("rules:")) else {
            return Vec::new();
        };
        if !key.trim_start()["rules:".len()..].trim().is_empty() {
            return Vec::new();
        }
        let key_indent = indent(key);
        let mut item_indent = None;
        let mut out = Vec::new();
        for (i, l) in lines {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let at = indent(l);
            let is_item = t == "-" || t.starts_with("- ");
            if at < key_indent || (at == key_indent && !is_item) {
                break;
            }
            if is_item && item_indent.is_none_or(|want| want == at) {
                item_indent = Some(at);
                out.push(self.first_line + i);
            }
        }
        out
    }
}

fn is_marker(line: &str) -> bool {
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

/// True for lines that carry no document content.
fn is_filler(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t == "..." || is_marker(t) && marker_rest_is_empty(t)
}

fn marker_rest_is_empty(marker: &str) -> bool {
    let rest = marker[3..].trim();
    rest.is_empty() || rest.starts_with('#')
}

/// The documents of `input` that have content, in order.
pub fn split_documents(input: &str) -> Vec<RawDoc<'_>> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let mut docs = Vec::new();
    let mut chunk_start = 0usize; // byte offset
    let mut chunk_first_line = 1usize;
    let mut offset = 0usize;
    let mut push = |start: usize, end: usize, first_line: usize| {
        let text = &input[start..end];
        let content = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .position(|l| !is_filler(l));
        if let Some(i) = content {
            docs.push(RawDoc {
                text,
                first_line,
                start_line: first_line + i,
            });
        }
    };
    for (i, line) in input.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare) && offset > chunk_start {
            push(chunk_start, offset, chunk_first_line);
            chunk_start = offset;
            chunk_first_line = i + 1;
        }
        offset += line.len();
    }
    push(chunk_start, input.len(), chunk_first_line);
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (first_line, start_line, first line of the document's text)
    type Found<'a> = (usize, usize, &'a str);

    #[test]
    fn split_table() {
        let cases: &[(&str, &[Found<'_>])] = &[
            ("", &[]),
            ("# only a comment\n---\n", &[]),
            ("a: 1\n", &[(1, 1, "a: 1")]),
            ("---\na: 1\n", &[(1, 2, "---")]),
            (
                "a: 1\n---\n\nb: 2\n--- # c\n---\nc: 3",
                &[(1, 1, "a: 1"), (2, 4, "---"), (6, 7, "---")],
            ),
            ("--- {a: 1}\n", &[(1, 1, "--- {a: 1}")]),
            ("x: |\n  ---- not a marker\n", &[(1, 1, "x: |")]),
            ("a: 1\r\n---\r\nb: 2\r\n", &[(1, 1, "a: 1"), (2, 3, "---")]),
        ];
        for (input, want) in cases {
            let got: Vec<Found<'_>> = split_documents(input)
                .iter()
                .map(|d| {
                    let first = d.text.lines().next().unwrap_or("");
                    (d.first_line, d.start_line, first.trim_end_matches('\r'))
                })
                .collect();
            assert_eq!(&got, want, "{input:?}");
        }
    }

    #[test]
    fn rule_lines_point_at_each_rule() {
        let input = "kind: AuthorizationPolicy\nspec:\n  rules:\n    - from: [a]\n      to:\n        - paths: [x]\n    # note\n    - to: [b]\n  action: ALLOW\n";
        assert_eq!(split_documents(input)[0].rule_lines(), vec![4, 8]);
        let same_indent = "spec:\n  rules:\n  - {}\n  - to: [b]\n  action: DENY\n";
        assert_eq!(split_documents(same_indent)[0].rule_lines(), vec![3, 4]);
        let flow = "spec:\n  rules: [{}, {}]\n";
        assert!(split_documents(flow)[0].rule_lines().is_empty());
    }

    #[test]
    fn line_of_finds_the_field() {
        let input = "a: 1\n---\nkind: X\nspec:\n  paths: [\"bad\"]\n";
        let docs = split_documents(input);
        assert_eq!(docs[1].line_of("\"bad\""), 5);
        assert_eq!(docs[1].line_of("absent"), 3);
    }
}
