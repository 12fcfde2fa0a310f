#!/usr/bin/env python3
"""Where a proxy's CPU goes, by component, from perf's call stacks (pair.sh --flamegraph).

Usage:
  perf script -F comm,tid,period,ip,sym,dso,srcline --full-source-path -i DATA \\
    | flame_components.py fold NAME.folded NAME.json
  flame_components.py table [--us-per-request LABEL=US ...] LABEL=NAME.json [LABEL=NAME.json ...]

`fold` writes the folded stacks inferno-flamegraph draws (root first; a function the compiler
inlined is a frame of its own, marked _[i] and named by its crate; kernel frames end in _[k])
and NAME.json, the CPU time sampled per component. `table` prints one Markdown table: a row per
component, a column per LABEL, and with --us-per-request LABEL=US (the proxy's CPU µs per
request, as pair.sh measures it) each share also in µs per request.

Each sample is charged to the code it was running (self time), found by its source file:
the crate's directory in Cargo's registry or in third_party/, the workspace for meshgate's own
code. Rust's standard library and `bytes` are generic code instantiated by their callers, so
such a sample goes to the nearest caller outside them: a `Vec` grown by hyper is hyper's.
memcpy, memset and the allocator keep their own rows wherever they were called from. A Rust
function without line tables (the shipped binary: what it inlined counts as its own) goes by
the crate its symbol names; other code without them (glibc, OpenSSL, HAProxy's Debian binary,
the kernel) by its library or its function's name; HAProxy's binary keeps only its exported functions' names, so
its static functions count as "haproxy, unnamed".
"""
import collections
import json
import re
import sys

KERNEL = "kernel (TCP/IP, system calls, scheduler)"
TLS = "TLS: record crypto and protocol (rustls with ring or aws-lc; OpenSSL)"
MEM = "memcpy / memmove / memset"
ALLOC = "allocator (mimalloc; glibc malloc and HAProxy's pools)"
H2 = "HTTP/2 (h2; HAProxy's mux_h2 and HPACK)"
H1 = "HTTP/1.1 and HTTP types (hyper, httparse, http; HAProxy's h1, HTX)"
RUNTIME = "runtime, futures and event loop (tokio, futures, tower; HAProxy's pollers and tasks)"
TELEMETRY = "telemetry libraries (tracing, opentelemetry)"
OWN = "meshgate's own code (policy, hygiene, routing, metrics)"
SYSCALL = "system call wrappers (glibc, vDSO)"
UNNAMED = "haproxy, unnamed static functions"
OTHER = "other (HAProxy: its stream processing, ACLs, load balancing)"
ORDER = [KERNEL, TLS, MEM, ALLOC, H2, H1, RUNTIME, TELEMETRY, OWN, SYSCALL, UNNAMED, OTHER]

CRATES = {
    H2: {"h2"},
    H1: {"hyper", "hyper-util", "httparse", "http", "http-body", "http-body-util", "httpdate"},
    RUNTIME: {"tokio", "mio", "futures-util", "futures-core", "futures-channel", "futures-task",
              "tower", "tower-service", "tower-layer", "want", "pin-project-lite", "slab",
              "socket2", "parking_lot", "parking_lot_core", "lock_api"},
    TLS: {"rustls", "aws-lc-rs", "aws-lc-sys", "ring", "rustls-webpki", "rustls-pki-types",
          "tokio-rustls"},
    ALLOC: {"mimalloc", "libmimalloc-sys"},
    TELEMETRY: {"tracing", "tracing-core", "tracing-subscriber", "opentelemetry",
                "opentelemetry_sdk", "opentelemetry-otlp", "opentelemetry-http"},
}
CRATE_COMPONENT = {crate: component for component, crates in CRATES.items() for crate in crates}
# Generic code charged to its caller: Rust's standard library (its own copy of hashbrown
# included) and `bytes`.
GENERIC_PATH = re.compile(r"^/rustc/[0-9a-f]+/library/|^/rust/deps/|/bytes-[0-9][^/]*/")
REGISTRY_CRATE = re.compile(r"/registry/src/[^/]+/([A-Za-z0-9_-]+?)-[0-9]+\.[0-9]+\.[0-9]+[^/]*/")
RUST_SYMBOL = re.compile(r"^<?([a-z_][a-z0-9_]*)::")
VENDORED_CRATE = re.compile(r"(?:^|/)third_party/([A-Za-z0-9_-]+)/")
# Crates whose generic code their callers instantiate (their frames are charged to the caller).
GENERIC_CRATES = {"core", "alloc", "std", "bytes"}
# memcpy and the allocator keep their own rows, wherever they were called from.
ANYWHERE_RULES = [
    (re.compile(r"^(__)?mem(cpy|move|set)|^__memmove|^__memcpy|^__memset"), MEM),
    (re.compile(r"^_?mi_|^__rust_(alloc|dealloc|realloc)|^(__GI_)?(__libc_)?(malloc|free|calloc|realloc|cfree)$|"
                r"^_int_(malloc|free)|^unlink_chunk|^malloc_consolidate|^__?pool_|^pool_|^tcache"), ALLOC),
]
# Code without line tables, by its function's name.
NAME_RULES = ANYWHERE_RULES + [
    (re.compile(r"^(SSL_|ssl|tls1?_|EVP_|aesni|ossl_|CRYPTO_|BIO_|ERR_|OPENSSL_|gcm_|aes_|ring_core_|aws_lc_)"), TLS),
    (re.compile(r"^(h2_|h2c_|hpack_|__hpack|_h2_)"), H2),
    (re.compile(r"^(h1_|htx_|http_|__htx)"), H1),
    (re.compile(r"^(fd_|_do_poll|run_poll|run_tasks|process_runnable|task_|tasklet|__task|wake_|sched_)"), RUNTIME),
    (re.compile(r"^(__GI_)?(__)?(libc_)?(writev|readv|recv|recvfrom|send|sendto|read|write|epoll_wait|"
                r"epoll_ctl|clock_gettime|__vdso_\w+|syscall|accept4?|close|futex_wait)\b"), SYSCALL),
]


def crate_of(path):
    """The crate a source file belongs to, from its directory in Cargo's registry or in
    third_party/; None for the workspace, Rust's standard library and C sources."""
    m = path and (REGISTRY_CRATE.search(path) or VENDORED_CRATE.search(path))
    return m.group(1) if m else None


def charge(frames):
    """The component of a sample: frames are (symbol, dso, source path), innermost first."""
    symbol, dso, _ = frames[0]
    if dso == "[kernel.kallsyms]":
        return KERNEL
    for pattern, component in ANYWHERE_RULES:
        if pattern.search(symbol):
            return component
    for symbol, dso, path in frames:
        if path and path.startswith("./"):
            path = None  # glibc's sources (relative paths): named by the function, below
        if path and not GENERIC_PATH.search(path):
            crate = crate_of(path)
            if crate:
                return CRATE_COMPONENT.get(crate, OTHER)
            if path.startswith("/") and not path.startswith("/rustc/"):
                return OWN  # a workspace crate's source (meshgate's own code)
        if path:
            continue  # generic standard-library code: its caller instantiated it
        # No line tables: a C library, HAProxy, or a Rust symbol without debug info (the shipped
        # binary), named by its path: `h2::…`, `<hyper::…`, `meshgate_proxy::…`.
        m = RUST_SYMBOL.match(symbol)
        if m:
            crate = m.group(1).replace("_", "-")
            if crate in GENERIC_CRATES:
                continue  # generic: its caller instantiated it
            if crate.startswith("meshgate"):
                return OWN
            component = CRATE_COMPONENT.get(crate) or CRATE_COMPONENT.get(m.group(1))
            if component:
                return component
        if "libcrypto" in dso or "libssl" in dso:
            return TLS
        if symbol in ("[unknown]", "") and "haproxy" in dso:
            return UNNAMED
        for pattern, component in NAME_RULES:
            if pattern.search(symbol):
                return component
        if "haproxy" in dso or "libc" in dso or "vdso" in dso:
            return OTHER
    return OTHER


def frame_name(symbol, dso, path, inlined):
    name = symbol.replace(";", ",") or "[unknown]"
    if dso == "[kernel.kallsyms]":
        return name + "_[k]"
    if inlined:
        # An inlined function's debug name has no path: name it by its crate, without the
        # generic arguments that make it a screen wide.
        name = re.sub(r"<.*>", "<…>", name)
        if path and GENERIC_PATH.search(path) and not crate_of(path):
            crate = "std"
        elif path and path.startswith("./"):
            crate = "glibc"
        else:
            crate = crate_of(path) or "meshgate"
        return f"{crate}::{name}_[i]"
    if dso and dso not in ("[unknown]",) and name == "[unknown]":
        return f"[{dso.rsplit('/', 1)[-1]}]"
    return name


def samples(lines):
    """Yields (comm, period, groups), innermost first. A group is one real function's frame:
    [symbol, dso, source path of the sampled address, inlined], where inlined lists what the
    compiler inlined into it at that address as (name, source path) pairs, innermost first; the
    last of them is the function itself, at the line that called the rest."""
    header, groups = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if header is not None:
                yield header[0], header[1], groups
            header, groups = None, []
        elif not line.startswith((" ", "\t")):
            fields = line.split()
            header = (fields[0], int(fields[-1]) if fields[-1].isdigit() else 1)
        elif line.startswith("\t"):
            m = re.match(r"\t\s*[0-9a-f]+ (.*?)(?: \(([^()]*)\))?$", line)
            if not m:
                continue
            if m.group(2) is None and groups:  # an inlined function: no dso of its own
                groups[-1][3].append([m.group(1), None])
            else:
                groups.append([m.group(1), m.group(2) or "", None, []])
        elif groups:  # "  file:line" or "  file:line (inlined)": the source of the line above
            path = line.strip().split(" (inlined)")[0].rsplit(":", 1)[0]
            # "??", "[vdso][…]", or a binary without line tables: "meshgate.<hash>-cgu.0:0".
            path = path if "/" in path and not path.startswith(("??", "[")) else None
            if groups[-1][3]:
                groups[-1][3][-1][1] = path
            else:
                groups[-1][2] = path
    if header is not None:
        yield header[0], header[1], groups


def fold(out_folded, out_json):
    stacks = collections.Counter()
    components = collections.Counter()
    for comm, period, groups in samples(sys.stdin):
        if not groups:
            continue
        code = []  # (symbol, dso, source path), innermost first
        names = []  # frame names, innermost first
        for symbol, dso, path, inlined in groups:
            code.append((symbol, dso, path))
            code.extend((name, dso, src) for name, src in inlined)
            names.extend(frame_name(name, dso, src, True) for name, src in inlined[:-1])
            if symbol != "[unknown]" or dso != "[unknown]":
                names.append(frame_name(symbol, dso, path, False))
        components[charge(code)] += period
        stacks[";".join([comm] + names[::-1])] += period
    if not stacks:
        sys.exit("no samples in perf script's output (was the proxy busy while perf recorded it?)")
    with open(out_folded, "w") as f:
        for stack, n in sorted(stacks.items()):
            f.write(f"{stack} {n}\n")
    with open(out_json, "w") as f:
        json.dump(dict(components), f, indent=1)


def table(argv):
    per_request = {}
    inputs = []
    args = iter(argv)
    for arg in args:
        if arg == "--us-per-request":
            label, _, us = next(args).partition("=")
            per_request[label] = float(us)
        elif "=" in arg:
            inputs.append(arg.split("=", 1))
        else:
            sys.exit(__doc__)
    if not inputs:
        sys.exit(__doc__)
    columns = []
    for label, path in inputs:
        counts = collections.Counter(json.load(open(path)))
        columns.append((label, counts, sum(counts.values())))
    print("| component | " + " | ".join(label for label, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in ORDER:
        if not any(counts[name] for _, counts, _ in columns):
            continue
        cells = []
        for label, counts, total in columns:
            share = counts[name] / total
            cell = f"{share * 100:.1f} %"
            if label in per_request:
                cell += f" ({share * per_request[label]:.1f} µs)"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    # pair.sh records perf's cpu-clock event, which weighs each sample by its period in ns.
    print("| CPU time sampled | " + " | ".join(f"{total / 1e6:,.0f} ms" for _, _, total in columns) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["fold"] and len(sys.argv) == 4:
        fold(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["table"]:
        table(sys.argv[2:])
    else:
        sys.exit(__doc__)
