#!/usr/bin/env python3
"""Turn run.sh's results (TSV: round, scenario, proxy, metric, value) into Markdown tables.

Each figure is the median over rounds; a latency figure is "added over the direct path", taken
per round (proxy minus direct in the same round) before the median. Ratios are to the best peer
(nginx or HAProxy) of the same run: below 1.00× is better than the best peer for costs
(latency, CPU, memory), above 1.00× is better for rates (RPS, handshakes/s).
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict

PEERS = ["nginx", "haproxy"]
ROWS = ["nginx", "haproxy", "meshgate", "meshgate-info", "meshgate-json", "meshgate-traced"]
LABEL = {
    "direct": "direct (no proxy)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "meshgate": "meshgate (MESHGATE_LOG=warn)",
    "meshgate-info": "meshgate (default log level, text)",
    "meshgate-json": "meshgate (default log level, JSON)",
    "meshgate-traced": "meshgate (default log level, JSON, tracing at 1 %)",
    "meshgate-preserve": "meshgate (MESHGATE_LOG=warn, `--mesh-protocol preserve`)",
    "meshgate-accel": "meshgate (MESHGATE_LOG=warn, eBPF local acceleration)",
    "haproxy-h2": "HAProxy (`proto h2` toward the client and the app)",
    "meshgate-h2": "meshgate (MESHGATE_LOG=warn, `--app-protocol h2c`)",
}
# Measured on the mesh path only.
MESH_ROWS = ROWS + ["meshgate-preserve", "meshgate-accel"]
# HTTP/2 end to end: nginx cannot proxy HTTP/2 to an upstream (but as gRPC), so HAProxy's pair
# is the one peer.
H2_PEERS = ["haproxy-h2"]
H2_ROWS = H2_PEERS + ["meshgate-h2"]


def oha(path):
    with open(path) as f:
        d = json.load(f)
    lat = d.get("latencyPercentiles", {})
    codes = d.get("statusCodeDistribution", {}) or {}
    ok = sum(v for k, v in codes.items() if str(k) == "200")
    other = sum(v for k, v in codes.items() if str(k) != "200")
    errors = sum((d.get("errorDistribution") or {}).values())
    total_time = d["summary"].get("total") or 0
    return {
        "p50": (lat.get("p50") or 0) * 1e6,
        "p90": (lat.get("p90") or 0) * 1e6,
        "p99": (lat.get("p99") or 0) * 1e6,
        "rps": ok / total_time if total_time else d["summary"].get("requestsPerSec", 0),
        "ok": ok,
        "bad": other + errors,
        "what": ", ".join([f"{v} × {k}" for k, v in codes.items() if str(k) != "200"]
                          + [f"{v} × {k}" for k, v in (d.get("errorDistribution") or {}).items()]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--clk-tck", type=int, default=100)
    ap.add_argument("--idle-n", type=int, default=1000)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--json")
    a = ap.parse_args()

    raw = defaultdict(dict)  # (round, scenario, proxy) -> metric -> value
    for line in open(a.results):
        r, scen, proxy, metric, value = line.rstrip("\n").split("\t")
        raw[(int(r), scen, proxy)][metric] = value
    rounds = sorted({k[0] for k in raw})
    warnings = []

    # per round figures
    per = defaultdict(lambda: defaultdict(list))  # (scenario, proxy) -> figure -> [per round]
    for r in rounds:
        for scen in ("inbound", "mesh", "h2"):
            direct_lat = raw.get((r, scen, "direct"), {}).get("lat")
            dl = oha(direct_lat) if direct_lat else None
            for proxy in ["direct"] + (H2_ROWS if scen == "h2" else MESH_ROWS):
                m = raw.get((r, scen, proxy))
                if not m:
                    continue
                lat, sat = oha(m["lat"]), oha(m["sat"])
                for o, what in ((lat, "fixed rate"), (sat, "saturation")):
                    if o["bad"]:
                        warnings.append(f"round {r} {scen} {proxy} {what}: {o['bad']} non-200 responses or errors ({o['what']})")
                f = per[(scen, proxy)]
                for q in ("p50", "p90", "p99"):
                    f[q].append(lat[q])
                    if dl and proxy != "direct":
                        f["added_" + q].append(lat[q] - dl[q])
                f["rps"].append(sat["rps"])
                us = 1e6 / a.clk_tck
                if sat["ok"]:
                    cin = int(m.get("cpu_in_ticks", 0)) * us / sat["ok"]
                    f["cpu_in"].append(cin)
                    if "cpu_out_ticks" in m:
                        cout = int(m["cpu_out_ticks"]) * us / sat["ok"]
                        f["cpu_out"].append(cout)
                        f["cpu_both"].append(cin + cout)
        for proxy in ROWS:
            m = raw.get((r, "handshake", proxy))
            if m:
                o = oha(m["sat"])
                if o["bad"]:
                    warnings.append(f"round {r} handshake {proxy}: {o['bad']} non-200 responses or errors")
                per[("handshake", proxy)]["hs"].append(o["rps"])
                if o["ok"]:
                    per[("handshake", proxy)]["cpu_hs"].append(int(m["cpu_in_ticks"]) * 1e6 / a.clk_tck / o["ok"])
            m = raw.get((r, "tracing", proxy))
            if m:
                per[("tracing", proxy)]["exports"].append(int(m["exports"]))
                per[("tracing", proxy)]["export_kib"].append(int(m["export_bytes"] or 0) / 1024)
                if not int(m["exports"]):
                    warnings.append(f"round {r} {proxy}: no OTLP export received: the row measured no tracing")
            m = raw.get((r, "first", proxy))
            if m:
                per[("first", proxy)]["p50"].append(float(m["p50_us"]))
                per[("first", proxy)]["p90"].append(float(m["p90_us"]))
            m = raw.get((r, "rss", proxy))
            if m:
                fresh, idle, opened = int(m["fresh_kib"]), int(m["idle_kib"]), int(m["idle_opened"])
                per[("rss", proxy)]["fresh_mib"].append(fresh / 1024)
                if "fresh_file_kib" in m:
                    per[("rss", proxy)]["fresh_file_mib"].append(int(m["fresh_file_kib"]) / 1024)
                # Per connection: the slope from a warm-up connection on (run.sh's idle_rss);
                # a record without one (an older run) counts from fresh.
                warm = int(m.get("warm_kib", fresh))
                if "warm_kib" in m:
                    per[("rss", proxy)]["first_kib"].append(warm - fresh)
                if opened:
                    per[("rss", proxy)]["idle_kib_per_conn"].append((idle - warm) / opened)
                if opened != a.idle_n:
                    warnings.append(f"round {r} rss {proxy}: only {opened} of {a.idle_n} idle connections open")
                if "idle_req_kib" in m:
                    fresh_r, idle_r, opened_r = int(m["fresh_req_kib"]), int(m["idle_req_kib"]), int(m["idle_req_opened"])
                    warm_r = int(m.get("warm_req_kib", fresh_r))
                    if "warm_req_kib" in m:
                        per[("rss", proxy)]["first_req_kib"].append(warm_r - fresh_r)
                    if opened_r:
                        per[("rss", proxy)]["idle_req_kib_per_conn"].append((idle_r - warm_r) / opened_r)
                    if opened_r != a.idle_n:
                        warnings.append(f"round {r} rss {proxy}: only {opened_r} of {a.idle_n} idle connections open after a request")

    med = {k: {fig: statistics.median(v) for fig, v in f.items() if v} for k, f in per.items()}

    def fig(scen, proxy, name):
        return med.get((scen, proxy), {}).get(name)

    def best_peer(scen, name, higher_better):
        peers = H2_PEERS if scen == "h2" else PEERS
        vals = [fig(scen, p, name) for p in peers if fig(scen, p, name) is not None]
        if not vals:
            return None
        return max(vals) if higher_better else min(vals)

    def cell(scen, proxy, name, unit, higher_better=False, digits=0):
        v = fig(scen, proxy, name)
        if v is None:
            return "–"
        s = f"{v:,.{digits}f}{unit}"
        b = best_peer(scen, name, higher_better)
        if b is not None and b > 0 and (v > 0 or higher_better):
            s += f" ({v / b:.2f}×)"
        return s

    # One row of a two-proxy table (mesh path, HTTP/2 end to end): added latency, saturation,
    # CPU per request of each proxy and of the pair; and the direct path's row above them.
    def pair_row(scen, p):
        return (f"| {LABEL[p]} | {cell(scen, p, 'added_p50', ' µs')} | {cell(scen, p, 'added_p90', ' µs')} | "
                f"{cell(scen, p, 'added_p99', ' µs')} | {cell(scen, p, 'rps', '', True)} | "
                f"{cell(scen, p, 'cpu_out', '', digits=1)} | {cell(scen, p, 'cpu_in', '', digits=1)} | "
                f"{cell(scen, p, 'cpu_both', '', digits=1)} |")

    def pair_direct_row(scen):
        d = "direct"
        return (f"| {LABEL[d]} | p50 {fig(scen, d, 'p50') or 0:.0f} µs | p90 {fig(scen, d, 'p90') or 0:.0f} µs | "
                f"p99 {fig(scen, d, 'p99') or 0:.0f} µs | {fig(scen, d, 'rps') or 0:,.0f} | – | (app {fig(scen, d, 'cpu_in') or 0:.1f}) | – |")

    # `run.sh --quick` measures the peers and meshgate's quiet row alone (not its log
    # configurations): rows with no figure at all are left out.
    rows = [p for p in ROWS if any(q == p for _, q in med)]
    out = []
    meta = dict(m.split("=", 1) for m in a.meta)
    out.append(f"Rounds: {len(rounds)} (figures are medians over rounds), {meta.get('duration_s', '?')} s per run; "
               f"{meta.get('pinning', '')}; machine quiet: {meta.get('machine_quiet', '?')}. "
               "Ratios: to the best peer (nginx or HAProxy) of this run.\n")

    out.append(f"### 1. Inbound: client (mTLS, HTTP/1.1) → proxy (client-cert check + path ACL) → app\n")
    out.append(f"Latency at a fixed {meta.get('rate', '?')} req/s (`-c {meta.get('lat_conns', '?')}`, latency-corrected), "
               f"added over the direct path; saturation closed loop `-c {meta.get('sat_conns', '?')}`; CPU of the proxy process(es) per request at saturation. "
               "The eBPF local acceleration row (root only): the caller is another pod, over mTLS on TCP as for every row; the inbound sidecar's hop to its own app instance passes socket to socket.\n")
    out.append("| proxy | added p50 | added p90 | added p99 | saturation RPS | CPU µs/request |")
    out.append("|---|---|---|---|---|---|")
    d = "direct"
    out.append(f"| {LABEL[d]} | p50 {fig('inbound', d, 'p50') or 0:.0f} µs | p90 {fig('inbound', d, 'p90') or 0:.0f} µs | "
               f"p99 {fig('inbound', d, 'p99') or 0:.0f} µs | {fig('inbound', d, 'rps') or 0:,.0f} | (app {fig('inbound', d, 'cpu_in') or 0:.1f}) |")
    for p in rows + ["meshgate-accel"]:
        if p not in rows and fig('inbound', p, 'rps') is None:
            continue  # no local acceleration (not root)
        out.append(f"| {LABEL[p]} | {cell('inbound', p, 'added_p50', ' µs')} | {cell('inbound', p, 'added_p90', ' µs')} | "
                   f"{cell('inbound', p, 'added_p99', ' µs')} | {cell('inbound', p, 'rps', '', True)} | "
                   f"{cell('inbound', p, 'cpu_in', '', digits=1)} |")
    out.append("")

    out.append("### 2. Mesh path: client (plain HTTP/1.1) → outbound proxy → mTLS → inbound proxy (ACL) → app\n")
    out.append("Between the proxies: nginx HTTP/1.1 with upstream keep-alive, HAProxy HTTP/2 (ALPN h2), meshgate HTTP/2 (HTTP/1.1 with `--mesh-protocol preserve`). "
               "CPU per request of each proxy process at saturation (outbound + inbound = the pair). "
               "The eBPF local acceleration row (root only) is meshgate as deployed with `meshgate redirect`: its two local hops "
               "(client → outbound proxy, inbound proxy → its own app instance) pass socket to socket in the kernel; the peers run without it, "
               "as they would as sidecars (`pair.sh --accel --haproxy` measures the same kernel path under HAProxy).\n")
    out.append("| proxies | added p50 | added p90 | added p99 | saturation RPS | CPU µs/req outbound | CPU µs/req inbound | CPU µs/req pair |")
    out.append("|---|---|---|---|---|---|---|---|")
    out.append(pair_direct_row("mesh"))
    for p in MESH_ROWS:
        if p not in rows and fig('mesh', p, 'rps') is None:
            continue  # a binary without --mesh-protocol, or no local acceleration (not root)
        out.append(pair_row("mesh", p))
    out.append("")

    if fig("h2", "meshgate-h2", "rps") is not None:
        out.append("### 2b. HTTP/2 end to end: client (h2c) → outbound proxy → mTLS, HTTP/2 → inbound proxy (ACL) → app (h2c)\n")
        out.append("As gRPC traffic runs: the load generator speaks HTTP/2 with prior knowledge over connections of several streams each "
                   "(the same total concurrency as above: connections × streams), and the app is its own nginx instance speaking h2c only. "
                   "nginx cannot proxy HTTP/2 to an upstream (but as gRPC), so the ratios are to HAProxy's pair alone. "
                   "CPU per request of each proxy process at saturation.\n")
        out.append("| proxies | added p50 | added p90 | added p99 | saturation RPS | CPU µs/req outbound | CPU µs/req inbound | CPU µs/req pair |")
        out.append("|---|---|---|---|---|---|---|---|")
        out.append(pair_direct_row("h2"))
        for p in H2_ROWS:
            out.append(pair_row("h2", p))
        out.append("")

    out.append("### 3. Handshakes: a new mTLS connection per request (TLS 1.3, no resumption), closed loop\n")
    out.append(f"`--disable-keepalive -c {meta.get('hs_conns', '?')}` against the inbound proxy; the load generator does a full "
               "client-certificate handshake too, so the rate may be bounded by the client: CPU µs per handshake of the proxy is the fairer figure.\n")
    out.append("| proxy | handshakes/s | proxy CPU µs per handshake+request |")
    out.append("|---|---|---|")
    for p in rows:
        out.append(f"| {LABEL[p]} | {cell('handshake', p, 'hs', '', True)} | {cell('handshake', p, 'cpu_hs', '', digits=0)} |")
    out.append("")

    out.append("### 3b. First request on a new connection, from a client with Nagle's algorithm on\n")
    out.append(f"{meta.get('first_n', '?')} new mTLS connections one after another (`first_request.py`; TLS 1.3, client certificate); "
               "the time from the request's write to the end of the response, the handshake not included. "
               "A server that sends nothing after the client's Finished and delays its ACK holds such a client for the delayed-ACK timer (≥ 40 ms).\n")
    out.append("| proxy | p50 | p90 |")
    out.append("|---|---|---|")
    for p in rows:
        out.append(f"| {LABEL[p]} | {cell('first', p, 'p50', ' µs')} | {cell('first', p, 'p90', ' µs')} |")
    out.append("")

    out.append(f"### 4. Memory of the inbound proxy (VmRSS, process tree)\n")
    out.append(f"Fresh: right after start, before any traffic. First connection: what one idle mTLS connection added to "
               "fresh (it also faults in the code of the handshake, and of the request path after a request, once). "
               f"Per idle connection: {a.idle_n} more mTLS connections opened and held without a request; "
               "(RSS with them − RSS with the first) / connections. After one request: the same on freshly started "
               "processes, each connection having sent one kept-alive GET first (as a client's pool holds them between requests).\n")
    out.append("| proxy | RSS fresh | of it file-backed (code, shared) | first connection | RSS per idle mTLS connection | "
               "first connection, after a request | per idle connection after one request |")
    out.append("|---|---|---|---|---|---|---|")
    for p in rows:
        shared = fig("rss", p, "fresh_file_mib")
        shared = "–" if shared is None else f"{shared:.1f} MiB"
        out.append(f"| {LABEL[p]} | {cell('rss', p, 'fresh_mib', ' MiB', digits=1)} | {shared} | "
                   f"{cell('rss', p, 'first_kib', ' KiB', digits=0)} | {cell('rss', p, 'idle_kib_per_conn', ' KiB', digits=1)} | "
                   f"{cell('rss', p, 'first_req_kib', ' KiB', digits=0)} | {cell('rss', p, 'idle_req_kib_per_conn', ' KiB', digits=1)} |")
    out.append("")

    configurations = [p for p in ("meshgate", "meshgate-info", "meshgate-json", "meshgate-traced") if p in rows]
    out.append("### 5. meshgate's log configurations vs its quiet one (goal: within 10 %)\n")
    if len(configurations) < 2:
        out.append("Not measured in this run: `run.sh --quick` leaves the log configurations out (`--quick --all-rows` puts them back).")
    else:
        out.append("| configuration | inbound added p50 | inbound saturation RPS | inbound CPU µs/req | mesh added p50 | mesh saturation RPS | mesh CPU µs/req pair | handshakes/s |")
        out.append("|---|---|---|---|---|---|---|---|")
        base = "meshgate"
        checks = [("inbound", "added_p50", False), ("inbound", "rps", True), ("inbound", "cpu_in", False),
                  ("mesh", "added_p50", False), ("mesh", "rps", True), ("mesh", "cpu_both", False),
                  ("handshake", "hs", True)]
        for p in configurations:
            cells = []
            for scen, name, hb in checks:
                v, b = fig(scen, p, name), fig(scen, base, name)
                if v is None or not b:
                    cells.append("–")
                    continue
                ratio = v / b
                worse = (ratio < 1 / 1.1) if hb else (ratio > 1.1)
                cells.append(f"{ratio:.2f}×" + (" ✗" if worse and p != base else ""))
            out.append(f"| {LABEL[p]} | " + " | ".join(cells) + " |")
        out.append("\n✗ = more than 10 % worse than MESHGATE_LOG=warn.")
    exports = fig("tracing", "meshgate-traced", "exports")
    if exports is not None:
        out.append(f"\nmeshgate-traced: {exports:,.0f} OTLP exports per round "
                   f"({fig('tracing', 'meshgate-traced', 'export_kib'):,.0f} KiB; medians) reached the sink.")
    if warnings:
        out.append("\nWarnings:\n" + "\n".join(f"- {w}" for w in warnings))
    print("\n".join(out))

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "medians": {f"{s}/{p}": v for (s, p), v in med.items()},
                       "per_round": {f"{s}/{p}": v for (s, p), v in per.items()},
                       "warnings": warnings}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
