"""An HTTP target for scripts/bench-concurrency: `workers` workers, each taking
`service_ms` per request; requests beyond that wait in its queue, so past `workers` in
flight latency grows while throughput does not. GET /stats returns the events delivered
and the request latencies (arrival to answer, queueing included) since the last GET."""
import http.server
import json
import sys
import threading
import time

port, workers, service_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
slots = threading.Semaphore(workers)
lock = threading.Lock()
events = 0
latencies = []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Answers leave at once: with Nagle's algorithm the body (a second small write)
    # waits for the client's delayed ACK, adding ~40 ms to every request.
    disable_nagle_algorithm = True
    # Headers and body go out in one write.
    wbufsize = -1

    def log_message(self, *args):
        pass

    def do_POST(self):
        global events
        arrived = time.monotonic()
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with slots:
            time.sleep(service_ms / 1000)
        n = body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)
        with lock:
            events += n
            latencies.append(time.monotonic() - arrived)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        self.wfile.flush()

    def do_GET(self):
        global events, latencies
        with lock:
            out = {"events": events, "latencies": latencies}
            events, latencies = 0, []
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
