"""A load from its own process that records every request's outcome, for fault-injection runs.

C clients on keep-alive connections send the same body back to back (closed loop) until the
driver closes this process's stdin, or `--seconds` have passed (the bound), whichever comes
first. A request that fails (non-200 status, reset or refused connection, timeout) is recorded
and the client reconnects and goes on. `ready` is printed once every client has had one answer.
At the end, one JSON object on stdout:

    {"requests": [[start, end, status, answer], ...], "answers": [body, ...], "errors": {...}}

`start`/`end` are wall-clock seconds (time.time(), comparable with the driver's), `status` is
the HTTP status (0 for a connection error or timeout) and `answer` indexes the distinct 200
bodies in `answers` (-1 for a failure), so that the driver can check every answer it got.
bench/load.py does not fit here: it counts failures only, stops at the first connection error,
and keeps neither times nor answers.

    python bench/fault_load.py http://127.0.0.1:8000/m --clients 8 --seconds 20 --width 2048
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any


class Recorder:
    """Outcomes of every client's requests, shared between the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[list[Any]] = []
        self.answers: dict[bytes, int] = {}
        self.errors: Counter[str] = Counter()

    def record(self, start: float, end: float, status: int, body: bytes | None, error: str | None) -> None:
        with self.lock:
            answer = -1
            if status == 200 and body is not None:
                answer = self.answers.setdefault(body, len(self.answers))
            if error is not None:
                self.errors[error] += 1
            self.requests.append([start, end, status, answer])


def client(url: str, body: bytes, stop: threading.Event, answered: threading.Barrier, out: Recorder) -> None:
    """One client: one request at a time until `stop`; reconnects after any failure."""
    parts = urllib.parse.urlsplit(url)
    connection: http.client.HTTPConnection | None = None
    first = True
    while not stop.is_set():
        if connection is None:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        start = time.time()
        try:
            connection.request("POST", parts.path, body, {"content-type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            out.record(start, time.time(), 0, None, type(exc).__name__)
            connection.close()
            connection = None
            stop.wait(0.05)  # a refused connection fails at once: do not spin
            continue
        out.record(start, time.time(), response.status, data, None if response.status == 200 else str(response.status))
        if response.status == 200 and first:
            first = False
            with contextlib.suppress(threading.BrokenBarrierError):  # a client never got an answer: go on
                answered.wait()
    if connection is not None:
        connection.close()
    if first:
        answered.abort()  # never answered: let `main` stop waiting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="upper bound on the run")
    parser.add_argument("--width", type=int, default=2048, help="the model's input features")
    parser.add_argument("--value", type=float, default=0.5, help="every input feature")
    args = parser.parse_args()
    body = json.dumps({"inputs": [args.value] * args.width}).encode()
    stop = threading.Event()
    answered = threading.Barrier(args.clients + 1)
    out = Recorder()
    threads = [threading.Thread(target=client, args=(args.url, body, stop, answered, out)) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    timer = threading.Timer(args.seconds, stop.set)
    timer.start()
    try:
        answered.wait(timeout=args.seconds)
        print("ready", flush=True)
    except threading.BrokenBarrierError:
        print("never-ready", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    for thread in threads:
        thread.join()
    timer.cancel()
    answers = [json.loads(raw) for raw, _ in sorted(out.answers.items(), key=lambda item: item[1])]
    print(json.dumps({"requests": sorted(out.requests), "answers": answers, "errors": dict(out.errors)}), flush=True)


if __name__ == "__main__":
    main()
