"""A bounded streaming-chat load from its own process, for bench_text.py.

For each concurrency level C, and for each route in turn (so that routes compared with each other
run interleaved, level by level, and share whatever else the machine is doing): C clients on
keep-alive connections send streaming chat completions (`POST <route>/v1/chat/completions`,
`"stream": true`, greedy, fixed short prompts) back to back (closed loop) for `--seconds`; requests
in flight at the deadline finish and count. Before the levels, every prompt is asked once per route
without streaming, one at a time: those answers (text and `usage.completion_tokens`) are the
reference each streamed answer is checked against, and warm the replicas up. Prints one JSON object
on stdout:

    {"reference": {route: [...]}, "levels": [{"url", "concurrency", "seconds", "requests", "failed",
      "tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms",
      "differs", ...}]}

A streamed answer's tokens are the reference's `completion_tokens` when its text equals the
reference's (greedy decoding is deterministic), else its content chunks (one per token, except when
a multi-byte character spans two); `differs` counts those.

    python bench/text_load.py http://127.0.0.1:8000/a http://127.0.0.1:8000/b --levels 1,4,16 --seconds 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Describe a cat in one sentence.",
)


@dataclass
class Outcome:
    """One streamed request: wall-clock offsets from its level's start, in seconds."""

    prompt: int
    start: float
    end: float
    first_token: float | None
    text: str
    chunks: int
    error: str | None


def body(model: str, prompt: int, max_tokens: int, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[prompt]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()


def stream_once(connection: http.client.HTTPConnection, path: str, data: bytes, t0: float, prompt: int) -> Outcome:
    """Send one streaming request and read its server-sent events up to `data: [DONE]`."""
    start = time.perf_counter() - t0
    first: float | None = None
    text: list[str] = []
    chunks = 0
    connection.request("POST", path, data, {"content-type": "application/json", "accept": "text/event-stream"})
    response = connection.getresponse()
    if response.status != 200:
        detail = response.read()[:200].decode(errors="replace")
        return Outcome(prompt, start, time.perf_counter() - t0, None, "", 0, f"HTTP {response.status}: {detail}")
    while True:
        line = response.readline()
        if not line:
            return Outcome(prompt, start, time.perf_counter() - t0, first, "".join(text), chunks, "no [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            response.read()  # the end of the chunked body, so the connection can be reused
            return Outcome(prompt, start, time.perf_counter() - t0, first, "".join(text), chunks, None)
        event = json.loads(payload)
        if "error" in event:
            return Outcome(prompt, start, time.perf_counter() - t0, first, "".join(text), chunks, str(event["error"]))
        content = event["choices"][0]["delta"].get("content") or ""
        if content:
            if first is None:
                first = time.perf_counter() - t0
            text.append(content)
            chunks += 1


def client(url: str, model: str, index: int, max_tokens: int, t0: float, deadline: float, out: list[Outcome]) -> None:
    """One client: one request at a time until the deadline; reconnects after a failure."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/") + "/v1/chat/completions"
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    count = 0
    while time.perf_counter() < deadline:
        prompt = (index + count) % len(PROMPTS)
        count += 1
        try:
            out.append(stream_once(connection, path, body(model, prompt, max_tokens, True), t0, prompt))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            now = time.perf_counter() - t0
            out.append(Outcome(prompt, now, now, None, "", 0, f"{type(exc).__name__}: {exc}"))
            connection.close()
            connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    connection.close()


def reference(url: str, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """Each prompt's non-streamed greedy answer, asked alone (a batch of one)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    answers = []
    for prompt in range(len(PROMPTS)):
        connection.request(
            "POST",
            parts.path.rstrip("/") + "/v1/chat/completions",
            body(model, prompt, max_tokens, False),
            {"content-type": "application/json"},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"reference request for prompt {prompt} failed: HTTP {response.status}: {answer}")
        answers.append(
            {
                "prompt": PROMPTS[prompt],
                "text": answer["choices"][0]["message"]["content"],
                "completion_tokens": answer["usage"]["completion_tokens"],
            }
        )
    connection.close()
    return answers


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def run_level(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, ref: list[dict[str, Any]]
) -> dict[str, Any]:
    out: list[Outcome] = []
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(url, model, i, max_tokens, t0, t0 + seconds, out)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = [o for o in out if o.error is None]
    wall = max((o.end for o in out), default=time.perf_counter() - t0)
    tokens, differs = 0, 0
    for o in ok:
        if o.text == ref[o.prompt]["text"]:
            tokens += ref[o.prompt]["completion_tokens"]
        else:
            tokens += o.chunks
            differs += 1
    errors = sorted({o.error for o in out if o.error is not None})
    return {
        "url": url,
        "concurrency": clients,
        "loadavg": [load_before, os.getloadavg()[0]],
        "seconds": wall,
        "requests": len(ok),
        "failed": len(out) - len(ok),
        "errors": errors[:5],
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_p50_ms": ms(percentile([o.first_token - o.start for o in ok if o.first_token is not None], 0.5)),
        "ttft_p99_ms": ms(percentile([o.first_token - o.start for o in ok if o.first_token is not None], 0.99)),
        "latency_p50_ms": ms(percentile([o.end - o.start for o in ok], 0.5)),
        "latency_p99_ms": ms(percentile([o.end - o.start for o in ok], 0.99)),
        "differs": differs,
        "differing_examples": [
            {"prompt": PROMPTS[o.prompt], "streamed": o.text, "reference": ref[o.prompt]["text"]}
            for o in ok
            if o.text != ref[o.prompt]["text"]
        ][:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="the applications' routes, e.g. http://127.0.0.1:8000/chat")
    parser.add_argument("--model", default="chat")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients, one level after the other")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each level starts new requests")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    refs = {url: reference(url, args.model, args.max_tokens) for url in args.urls}
    levels = [
        run_level(url, args.model, int(c), args.seconds, args.max_tokens, refs[url])
        for c in args.levels.split(",")
        for url in args.urls
    ]
    print(json.dumps({"reference": refs, "levels": levels}), flush=True)


if __name__ == "__main__":
    main()
