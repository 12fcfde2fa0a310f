#!/usr/bin/env python3
"""Time the first request on N new mutual-TLS connections to HOST:PORT, one after another, from a
client that leaves Nagle's algorithm on (the socket default, as Java's sockets, Python's
http.client and `openssl s_client` do).

Each connection: TCP connect, TLS 1.3 handshake with the client certificate, then one HTTP/1.1 GET
of PATH; the time from the request's write to the end of the 200 response is recorded (the
handshake is not). A server that sends nothing after the client's Finished and delays its ACK
makes the client's kernel hold the request for the delayed-ACK timer (≥ 40 ms on Linux).

Prints "first P50_US P90_US OK FAILED" on stdout. Standard library only.
"""
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_conns import client_args, client_context, get_once  # noqa: E402


def main() -> int:
    ap = client_args("Time the first request on N new mutual-TLS connections.", 200)
    ap.add_argument("--path", default="/api/data")
    args = ap.parse_args()
    ctx = client_context(args.cert, args.key)

    took, failed = [], 0
    for _ in range(args.n):
        try:
            with ctx.wrap_socket(socket.create_connection((args.host, args.port), timeout=10)) as c:
                start = time.perf_counter()
                ok = get_once(c, args.path, args.host_header)
                elapsed = time.perf_counter() - start
        except OSError:
            ok = False
        if ok:
            took.append(elapsed * 1e6)
        else:
            failed += 1
    if not took:
        print(f"first 0 0 0 {failed}", flush=True)
        return 1
    q = statistics.quantiles(took, n=10) if len(took) > 1 else [took[0]] * 9
    print(f"first {statistics.median(took):.0f} {q[8]:.0f} {len(took)} {failed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
