"""Load on `diffdraft serve` over loopback: concurrent OpenAI clients, streaming and not, then the same
with the queue limit forced small. A benchmark that prints figures, not a timed test.

    .venv/bin/python scripts/serve_load.py                      # SmolLM2, 8 clients x 25 requests
    .venv/bin/python scripts/serve_load.py --servers w1,w2,b8 --clients 8,16
    .venv/bin/python scripts/serve_load.py --model DIR --clients 2 --requests 3 --max-tokens 8

Each run starts `diffdraft serve` as its own process on a free loopback port, waits for
/health, and sends MT-Bench first turns (cycled) from `--clients` threads, `--requests`
each, every other request streaming. A 429 is a clean refusal: the client waits its
Retry-After and sends the request again, for up to `--retry-for` seconds. Anything else that
is not a 200 (a 5xx, a broken stream, a timeout) counts as failed. Reported per run: requests
served, failed, lost (never answered) and still refused when the client stopped retrying,
429s seen, p50/p95 latency and time to first token (from the first send, retries included;
streaming: the first text chunk, otherwise the whole answer), completion tokens per second
over the run's wall time, and the server's own /metrics figures (tau). The clients run on
the same machine as the server, so on a small CPU they take some of its time.
The runs use the server's default queue, once per client count and per server in `--servers`
(wN: N thread workers, one request each; bN: one batch of up to N requests stepped together),
one after another, so their ratios are measured under the same conditions; a last run forces
--queue-limit small on the last server (skipped with --small-queue 0). Bounded: every request has a client timeout, and the whole script a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_server(spec: str) -> tuple[int, int | str]:
    """'w2' -> 2 thread workers (max batch 1); 'b8' -> one batched worker, max batch 8; 'bauto' -> the server's
    own choice of max batch."""
    kind, count = spec[:1], spec[1:]
    if kind == "b" and count == "auto":
        return 1, "auto"
    if kind not in ("w", "b") or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"a server is wN (N thread workers), bN (batches of up to N) or bauto, got {spec!r}")
    return (int(count), 1) if kind == "w" else (1, int(count))


def served_max_batch(log: Path) -> int:
    """The max batch the server announced (1 for thread workers)."""
    found = re.search(r"batches of up to (\d+) requests", log.read_text())
    return int(found.group(1)) if found else 1


def start_server(args, queue_limit: int, workers: int, max_batch: int | str, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv/bin/diffdraft"), "serve", "--port", str(port), "--queue-limit", str(queue_limit),
           "--served-model-name", "load", "--log-level", "warning", "--workers", str(workers),
           "--max-batch", str(max_batch)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if args.drafter:
        cmd += ["--drafter", args.drafter]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not come up in 10 minutes")


def prompts() -> list[str]:
    from diffdraft.suites import load_mtbench

    return [p.turns[0] for p in load_mtbench()]


def one_request(client: openai.OpenAI, prompt: str, stream: bool, max_tokens: int, retry_for: float) -> dict:
    """Send one chat request, retrying 429s for up to retry_for seconds; returns what happened."""
    seen_429 = 0
    start = time.monotonic()
    while True:
        try:
            if stream:
                first, text, usage = None, [], None
                for chunk in client.chat.completions.create(
                        model="load", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.monotonic()
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage = chunk.usage
                end = time.monotonic()
                tokens = usage.completion_tokens if usage else 0
                return {"ok": True, "stream": True, "latency": end - start, "ttft": (first or end) - start,
                        "tokens": tokens, "429": seen_429}
            answer = client.chat.completions.create(model="load", messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_tokens, temperature=0)
            end = time.monotonic()
            return {"ok": True, "stream": False, "latency": end - start, "ttft": end - start,
                    "tokens": answer.usage.completion_tokens, "429": seen_429}
        except openai.RateLimitError as err:
            seen_429 += 1
            wait = float(err.response.headers.get("retry-after", "1"))
            if time.monotonic() - start + wait > retry_for:
                return {"ok": False, "refused": True, "error": "still refused (429) when the client stopped retrying",
                        "429": seen_429}
            time.sleep(wait)
        except openai.APIError as err:
            return {"ok": False, "error": f"{type(err).__name__}: {err}", "429": seen_429}


def run_load(args, queue_limit: int, workers: int, max_batch: int | str, clients: int, label: str, out: Path) -> dict:
    port = free_port()
    server = start_server(args, queue_limit, workers, max_batch, port, out / f"server-{label}.log")
    asked, max_batch = max_batch, served_max_batch(out / f"server-{label}.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=args.timeout)
        texts = prompts()
        results: list[dict] = []
        lock = threading.Lock()

        def worker(c: int) -> None:
            for i in range(args.requests):
                prompt = texts[(c * args.requests + i) % len(texts)]
                result = one_request(client, prompt, stream=(c + i) % 2 == 0, max_tokens=args.max_tokens,
                                     retry_for=args.retry_for)
                with lock:
                    results.append(result)

        start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        server.terminate()
        server.wait(30)
    ok = [r for r in results if r["ok"]]
    sent = clients * args.requests

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)

    def gauge(name: str) -> float:
        return next((float(line.split()[1]) for line in metrics.splitlines() if line.startswith(name + " ")), 0.0)

    tau = gauge("diffdraft_tau")
    summary = {
        "run": label, "queue_limit": queue_limit, "workers": workers, "max_batch": max_batch,
        "max_batch_asked": asked, "clients": clients,
        "requests_sent": sent, "server_batch_size": gauge("diffdraft_batch_size"),
        "server_rows_per_step": gauge("diffdraft_batch_rows_per_step"),
        "served": len(ok), "failed": sum(1 for r in results if not r["ok"] and not r.get("refused")),
        "lost": sent - len(results), "refused_at_the_end": sum(1 for r in results if r.get("refused")),
        "rejected_429": sum(r["429"] for r in results), "wall_s": round(wall, 2),
        "latency_p50_s": round(pct([r["latency"] for r in ok], 50), 3),
        "latency_p95_s": round(pct([r["latency"] for r in ok], 95), 3),
        "latency_mean_s": round(statistics.fmean([r["latency"] for r in ok]), 3) if ok else 0.0,
        "latency_max_s": round(max([r["latency"] for r in ok], default=0.0), 3),
        "ttft_stream_p50_s": round(pct([r["ttft"] for r in ok if r["stream"]], 50), 3),
        "ttft_stream_p95_s": round(pct([r["ttft"] for r in ok if r["stream"]], 95), 3),
        "completion_tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2), "server_tau": tau,
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
    }
    (out / f"metrics-{label}.txt").write_text(metrics)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: smollm2")
    parser.add_argument("--drafter", default=None, help="default: the server's (auto)")
    parser.add_argument("--clients", default="8", help="concurrent clients; a comma list runs each count (default 8)")
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--small-queue", type=int, default=2, help="the queue limit of run 2")
    parser.add_argument("--retry-for", type=float, default=900.0, help="seconds a client retries a 429 (default 900)")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="server torch threads (default: the server's, every core split among its workers)")
    parser.add_argument("--servers", default="w1",
                        help="servers side by side, a comma list of wN (N thread workers) and bN (one batch of up to N "
                             "requests), e.g. w1,w2,b8 (default w1)")
    parser.add_argument("--out", default="results/serve-load")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = [(spec, *parse_server(spec)) for spec in args.servers.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]
    runs = []
    for clients in client_counts:  # every server under the same load, one after another
        for spec, workers, max_batch in servers:
            runs.append(run_load(args, 16, workers, max_batch, clients, f"c{clients}-{spec}", out))
    if args.small_queue > 0:
        spec, workers, max_batch = servers[-1]
        runs.append(run_load(args, args.small_queue, workers, max_batch, client_counts[0], f"small-queue-{spec}", out))
    (out / "load.json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=2) + "\n")
    for r in runs:
        print(f"{r['run']:16s} {r['clients']} clients, queue {r['queue_limit']:2d}, {r['workers']} worker(s), max batch "
              f"{r['max_batch']}: served "
              f"{r['served']}/{r['requests_sent']}, failed "
              f"{r['failed']}, lost {r['lost']}, refused at the end {r['refused_at_the_end']}, 429s "
              f"{r['rejected_429']}; latency p50 {r['latency_p50_s']:.2f} s "
              f"p95 {r['latency_p95_s']:.2f} s max {r['latency_max_s']:.1f} s; TTFT (stream) p50 {r['ttft_stream_p50_s']:.2f} s p95 "
              f"{r['ttft_stream_p95_s']:.2f} s; {r['tokens_per_s']:.1f} tok/s; tau {r['server_tau']:.2f}; "
              f"batch {r['server_batch_size']:.1f} requests, {r['server_rows_per_step']:.1f} rows per step"
              + (f"; errors {r['errors']}" if r["errors"] else ""))
    return 0 if all(r["failed"] == 0 and r["lost"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
