#!/usr/bin/env python3
"""An OTLP/HTTP sink for benchmarks: answers every export with 200 and an empty
ExportTraceServiceResponse (an empty protobuf message), and keeps the number of exports and
bytes received in COUNT_FILE, so a run can show that its sidecars did export.

Usage: otlp_sink.py PORT COUNT_FILE
"""
import http.server
import sys

port, count_file = int(sys.argv[1]), sys.argv[2]
received = {"exports": 0, "bytes": 0}


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        received["exports"] += 1
        received["bytes"] += length
        with open(count_file, "w") as f:
            f.write(f"{received['exports']} {received['bytes']}\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
