#!/usr/bin/env python3
"""Open N mutual-TLS connections to HOST:PORT and hold them idle until killed (with --plain,
plain TCP connections).

With --request PATH, each connection first sends one kept-alive HTTP/1.1 GET of PATH and reads
its whole response (a 200 is required), so the connections idle as a client's pool does between
requests rather than before its first one.

Prints "ready OPENED FAILED" on stdout once every handshake has been tried. Standard library only.
"""
import argparse
import signal
import socket
import ssl
import sys
import time


def get_once(c: ssl.SSLSocket, path: str, host: str) -> bool:
    """One GET on the kept-alive connection `c`; True when the whole 200 response was read."""
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        return False
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        return False
    while len(body) < length:
        chunk = c.recv(65536)
        if not chunk:
            return False
        body += chunk
    return len(body) == length


def client_args(description: str, n: int) -> argparse.ArgumentParser:
    """The options every client of these benches takes: where to connect, as whom, how often."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", help="client certificate chain (PEM, leaf first)")
    ap.add_argument("--key")
    ap.add_argument("--host-header", default="app")
    ap.add_argument("-n", type=int, default=n)
    return ap


def client_context(cert, key) -> ssl.SSLContext:
    """TLS 1.3 with the client certificate, ALPN http/1.1; the proxy's certificate is not
    checked (the peers' certificates name different identities; the ACL check in run.sh is
    what proves each proxy verifies the client)."""
    if not cert or not key:
        sys.exit("--cert and --key are required (the client certificate and its key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main() -> int:
    ap = client_args("Open N mutual-TLS connections and hold them idle until killed.", 1000)
    ap.add_argument("--request", metavar="PATH", help="one kept-alive GET of PATH first")
    ap.add_argument("--plain", action="store_true",
                    help="plain HTTP/1.1 connections (an app's to its outbound proxy): no TLS")
    args = ap.parse_args()
    ctx = None if args.plain else client_context(args.cert, args.key)

    conns, failed = [], 0
    for _ in range(args.n):
        try:
            s = socket.create_connection((args.host, args.port), timeout=10)
            c = s if ctx is None else ctx.wrap_socket(s)
            if args.request and not get_once(c, args.request, args.host_header):
                failed += 1
                c.close()
                continue
            conns.append(c)
        except OSError:
            failed += 1
    # TLS 1.3: the server checks the client certificate after our Finished; give it a moment,
    # then make sure none of the connections was refused (a refusal arrives as an alert/EOF).
    time.sleep(0.5)
    alive = 0
    for c in conns:
        c.setblocking(False)
        try:
            data = c.recv(1)
            if data == b"":
                failed += 1
                continue
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except (ssl.SSLError, OSError):
            failed += 1
            continue
        alive += 1
    print(f"ready {alive} {failed}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
