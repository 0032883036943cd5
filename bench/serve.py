"""lcdfast bench serve: `lcdfast serve` under load, from OpenAI-style streaming clients on 127.0.0.1.

1. one client, then `--clients` concurrent clients (default 16), greedy, `--new-tokens` each (default 128): aggregate
   decode tokens/s and its ratio to one client's, time to first token and per-token latency (p50, p99), and every
   response checked token for token (by text) against the same request run alone through Engine.generate;
2. a mixed load (`--mixed` requests, default 1000: greedy, ACD, DoLa and sampled at once, every tenth cancelled
   mid-stream): every other one must finish, every 25th is checked against Engine.generate, and the server's
   resident memory is sampled as it goes.

The server is a subprocess (compiled step; its graphs are compiled in a warm-up before anything is timed). Writes
serve.json and serve.md into --out. The CPU is recorded.

    python bench/serve.py [--model DIR] [--clients 16] [--new-tokens 128] [--mixed 1000] [--out bench/results]
"""

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

import lcdfast

PROMPTS = [
    "The history of the printing press begins", "In a small village at the foot of the mountains, an old clockmaker",
    "Photosynthesis is the process by which green plants", "The stock market fell sharply on Monday after",
    "Alan Turing was a British mathematician who", "The recipe calls for two cups of flour and",
    "Scientists have discovered a new species of frog in", "The first thing you notice when you enter the museum is",
    "The city council voted on Tuesday to", "Deep in the ocean, far below the reach of sunlight,",
    "The old lighthouse keeper had a secret:", "Quantum computers differ from classical computers because",
    "On the morning of the launch, the engineers", "The best way to learn a new language is",
    "When the river flooded the valley,", "The detective looked at the letter and",
]
MIXED = [dict(method="greedy"), dict(method="acd"), dict(method="dola", dola_layers="high", repetition_penalty=1.2),
         dict(method="sample", temperature=0.8, top_p=0.95)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def stream(url: str, body: dict, cancel_after: int | None = None) -> dict:
    """One streaming completion: its text, finish reason, token count, and times of the first and every chunk."""
    t0, times, text, finish, usage = time.perf_counter(), [], "", None, None
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode()[:200]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            times.append(time.perf_counter() - t0)
            choice = chunk["choices"][0]
            text += choice["text"]
            finish, usage = choice["finish_reason"], chunk.get("usage") or usage
            if cancel_after is not None and len(times) >= cancel_after:
                return {"status": 200, "cancelled": True}
    return {"status": 200, "text": text, "finish_reason": finish, "tokens": usage["completion_tokens"],
            "times": times}


def run_clients(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    results: list[dict] = [{}] * len(bodies)

    def one(i: int) -> None:
        results[i] = stream(url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def latencies(results: list[dict]) -> dict:
    ttft = [r["times"][0] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "token_p50_ms": 1000 * percentile(gaps, 50), "token_p99_ms": 1000 * percentile(gaps, 99)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: bundled SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mixed", type=int, default=1000, help="requests of the mixed load (0: skip it)")
    p.add_argument("--mixed-tokens", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    from lcdfast.convert import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lcdfast.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients),
           "--no-compile" if args.no_compile else "--compile"]
    server = subprocess.Popen(cmd)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        reference = lcdfast.load(model, compile=False)
        results = {"cpu": cpu_name(), "cores": os.cpu_count(), "model": str(model), "torch": torch.__version__,
                   "compiled": not args.no_compile, "clients": args.clients, "new_tokens": args.new_tokens}
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
        greedy = [{"prompt": q, "max_tokens": args.new_tokens, "temperature": 0} for q in prompts]
        t0 = time.perf_counter()  # warm-up: every batch bucket's graph (rows join one by one), then batch 1
        run_clients(url, greedy)
        run_clients(url, greedy[:1])
        results["warmup_seconds"] = time.perf_counter() - t0

        one, wall_one = run_clients(url, greedy[:1])
        many, wall_many = run_clients(url, greedy)
        rate_one = one[0]["tokens"] / wall_one
        rate_many = sum(r["tokens"] for r in many) / wall_many
        expected = {q: reference.generate(q, max_new_tokens=args.new_tokens)[0] for q in set(prompts)}  # alone
        equal = sum(r["text"] == expected[q].text for q, r in zip(prompts, many))
        results["one_client"] = {"tokens_per_s": rate_one, "seconds": wall_one, **latencies(one)}
        results["concurrent"] = {"tokens_per_s": rate_many, "seconds": wall_many, "ratio_to_one": rate_many / rate_one,
                                 "equal_to_generate": f"{equal}/{len(many)}", **latencies(many)}
        print(json.dumps(results, indent=1), flush=True)

        if args.mixed:
            results["mixed"] = mixed_load(url, server.pid, reference, args)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(results, indent=1))
    (out / "serve.md").write_text(markdown(results))
    print(markdown(results))


def mixed_load(url: str, pid: int, reference, args) -> dict:
    """`args.mixed` requests from `args.clients` threads: methods in turn, every tenth cancelled after 2 chunks."""
    rng = random.Random(0)
    jobs = []
    for i in range(args.mixed):
        options = MIXED[i % len(MIXED)]
        jobs.append((i, PROMPTS[rng.randrange(len(PROMPTS))], options, rng.randrange(1, args.mixed_tokens + 1)))
    outcomes: dict[int, dict] = {}
    memory: list[tuple[int, float]] = [(0, rss_mb(pid))]
    lock = threading.Lock()
    todo = list(jobs)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, prompt, options, n = todo.pop(0)
            body = {"prompt": prompt, "max_tokens": n, "seed": i, **options}
            if "temperature" not in body:
                body["temperature"] = 0
            outcomes[i] = stream(url, body, cancel_after=2 if i % 10 == 9 else None)
            with lock:
                if len(outcomes) % 100 == 0:
                    memory.append((len(outcomes), rss_mb(pid)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done = [i for i, *_ in jobs if outcomes[i].get("status") == 200]
    lost = [i for i, *_ in jobs if outcomes[i].get("status") != 200 or not (
        outcomes[i].get("cancelled") or outcomes[i].get("finish_reason") in ("stop", "length"))]
    checked = mismatched = 0
    for i, prompt, options, n in jobs[::25]:
        if outcomes[i].get("cancelled"):
            continue
        g = reference.generate(prompt, max_new_tokens=n, seed=i, **options)[0]
        checked += 1
        mismatched += g.text != outcomes[i].get("text")
    health = httpx.get(f"{url}/health").json()
    return {"requests": len(jobs), "ok": len(done), "lost": len(lost), "cancelled": sum(
        bool(o.get("cancelled")) for o in outcomes.values()), "checked": checked, "mismatched": mismatched,
        "seconds": seconds, "busy_after": health["busy"], "rss_mb": memory}


def markdown(r: dict) -> str:
    lines = [f"`lcdfast serve` on {r['cpu']} ({r['cores']} cores), torch {r['torch']}, "
             f"{'compiled' if r['compiled'] else 'eager'}; greedy, {r['new_tokens']} new tokens per request", "",
             "| clients | decode tok/s | x one client | TTFT p50 / p99 ms | per token p50 / p99 ms "
             "| equal to generate |",
             "|---|---|---|---|---|---|"]
    for name, n in (("one_client", 1), ("concurrent", r["clients"])):
        x = r.get(name)
        if x:
            lines.append(f"| {n} | {x['tokens_per_s']:.1f} | {x.get('ratio_to_one', 1.0):.2f} | "
                         f"{x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} | {x['token_p50_ms']:.1f} / "
                         f"{x['token_p99_ms']:.1f} | {x.get('equal_to_generate', '-')} |")
    m = r.get("mixed")
    if m:
        rss = m["rss_mb"]
        lines += ["", f"Mixed load: {m['requests']} requests (greedy, acd, dola, sample; {m['cancelled']} cancelled "
                  f"mid-stream) in {m['seconds']:.0f}s: {m['lost']} lost, {m['mismatched']}/{m['checked']} checked "
                  f"differ from generate, {m['busy_after']} left busy; server RSS {rss[0][1]:.0f} MB at start, "
                  f"{rss[1][1] if len(rss) > 1 else rss[0][1]:.0f} MB after {rss[1][0] if len(rss) > 1 else 0}, "
                  f"{rss[-1][1]:.0f} MB after {rss[-1][0]}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
