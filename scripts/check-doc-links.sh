#!/usr/bin/env bash
# Checks the relative links of the project's Markdown documents: every [text](target) that is
# not a URL must name an existing file or directory (relative to the document), and an anchor
# (#section), when given, must match a heading of the target document. Also refuses links that
# leave the repository (absolute paths, ../shared, …).
#
#   scripts/check-doc-links.sh            # README.md, SECURITY.md, BENCHMARKS.md, docs/*.md, xds-lite/PROTOCOL.md
#   scripts/check-doc-links.sh FILE.md …  # these files
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$root"

if [ "$#" -gt 0 ]; then
  files=("$@")
else
  files=(README.md SECURITY.md BENCHMARKS.md xds-lite/PROTOCOL.md docs/*.md)
fi

# GitHub's heading anchors: lowercase, punctuation except '-' and '_' dropped, spaces → '-'.
anchors_of() {
  awk '/^```/ { fence = !fence; next } !fence && /^#+ / { sub(/^#+ +/, ""); print }' "$1" |
    tr '[:upper:]' '[:lower:]' |
    sed -e 's/[^a-z0-9 _-]//g' -e 's/ /-/g'
}

failures=0
fail() {
  echo "$1: $2" >&2
  failures=$((failures + 1))
}

for doc in "${files[@]}"; do
  if [ ! -f "$doc" ]; then
    fail "$doc" "document does not exist"
    continue
  fi
  dir="$(dirname "$doc")"
  # Links outside code fences and inline code: [text](target) and [text](target "title").
  links="$(awk '/^```/ { fence = !fence; next } !fence' "$doc" |
    sed -e 's/`[^`]*`//g' |
    grep -o '\]([^)]*)' | sed -e 's/^](//' -e 's/)$//' -e 's/ .*//' || true)"
  for link in $links; do
    case "$link" in
      http://* | https://* | mailto:*) continue ;;
    esac
    case "$link" in
      /* | *../shared* | file:*)
        fail "$doc" "link leaves the repository: $link"
        continue
        ;;
    esac
    path="${link%%#*}"
    anchor=""
    if [ "$path" != "$link" ]; then
      anchor="${link#*#}"
    fi
    if [ -z "$path" ]; then
      target="$doc"
    else
      target="$dir/$path"
    fi
    if [ ! -e "$target" ]; then
      fail "$doc" "broken link: $link ($target does not exist)"
      continue
    fi
    case "$(cd "$(dirname "$target")" && pwd -P)/" in
      "$root"/*) ;;
      *)
        fail "$doc" "link leaves the repository: $link"
        continue
        ;;
    esac
    if [ -n "$anchor" ] && [ -f "$target" ] && [[ "$target" == *.md ]]; then
      if ! anchors_of "$target" | grep -qxF "$anchor"; then
        fail "$doc" "broken anchor: $link (no heading #$anchor in $target)"
      fi
    fi
  done
done

# No document may mention a path of the machine it was written on.
if grep -nE '\.\./shared|/work/' "${files[@]}"; then
  fail "docs" "the lines above refer to paths outside the repository"
fi

if [ "$failures" -gt 0 ]; then
  echo "check-doc-links: $failures problem(s)" >&2
  exit 1
fi
echo "check-doc-links: ${#files[@]} documents, all relative links resolve"
