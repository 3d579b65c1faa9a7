"""Measure a running server: N concurrent streaming clients, aggregate tokens/s and per-request latency.

    python -m tinyllama_ref.serve.loadtest http://127.0.0.1:8080 --clients 1,4,16 --requests 2 --max-tokens 32

Each client sends its requests one after another to POST /v1/completions with "stream": true and counts
the streamed chunks (one per token, on this server and on llama.cpp's llama-server alike), so the same
command measures both. Only the standard library is used; the target should be a machine you own.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

PROMPT = "The patient presented with fever and cough. Treatment with antibiotics was started, and"


def stream_once(url, max_tokens, prompt, timeout):
    """(seconds to the first token, total seconds, tokens) for one streamed completion."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            raise RuntimeError(f"server error: {chunk['error']}")
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            tokens += 1
            first = first or time.perf_counter() - t0
    conn.close()
    return first or 0.0, time.perf_counter() - t0, tokens


def run_level(url, clients, requests, max_tokens, timeout):
    """All clients at once; returns a dict of figures for this concurrency level."""
    results, errors = [], []

    def client():
        for _ in range(requests):
            try:
                results.append(stream_once(url, max_tokens, PROMPT, timeout))
            except (OSError, RuntimeError) as e:
                errors.append(str(e))
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    latency = [r[1] for r in results]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 3) if wall else None,
            "latency_median_s": round(statistics.median(latency), 2) if latency else None,
            "latency_max_s": round(max(latency), 2) if latency else None,
            "first_token_median_s": round(statistics.median(r[0] for r in results), 2) if results else None,
            "first_error": errors[0] if errors else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per request")
    args = ap.parse_args(argv)
    for clients in [int(c) for c in args.clients.split(",")]:
        print(json.dumps(run_level(args.url, clients, args.requests, args.max_tokens, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
