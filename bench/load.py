"""A bounded load from its own process: C clients, each sending its share of R requests back to back.

Run by bench_serve.py so that the load generator never competes with the
benchmark driver for the GIL. Prints one JSON line: throughput, p50 and p99
latency in milliseconds, and the number of failed requests.

    python bench/load.py http://127.0.0.1:8000/m --concurrency 16 --requests 480 --width 2048
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor


def client(url: str, body: bytes, count: int) -> tuple[list[float], int]:
    """One client on one keep-alive connection: latencies of its successful requests, and failures."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    latencies, failures = [], 0
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", parts.path, body, {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status == 200:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
    connection.close()
    return latencies, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=480)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    body = json.dumps({"inputs": [0.5] * args.width}).encode()
    client(args.url, body, 4)  # warm-up: connections, first-call costs
    share = args.requests // args.concurrency
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda _: client(args.url, body, share), range(args.concurrency)))
    seconds = time.perf_counter() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    cuts = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "requests_per_s": len(latencies) / seconds,
                "p50_ms": cuts[49] * 1000,
                "p99_ms": cuts[98] * 1000,
                "failed": sum(f for _, f in results),
                "requests": share * args.concurrency,
                "concurrency": args.concurrency,
            }
        )
    )


if __name__ == "__main__":
    main()
