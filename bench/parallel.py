"""lcdfast bench parallel: tensor-parallel decoding against one process, and what the ranks' collectives cost.

One run, one machine: decode ms/token per method for one process using every thread and for --tp N ranks started
by torchrun (one thread each, gloo on CPU, nccl on CUDA), the same prompt and tokens; then, on the ranks, the
time of each collective a step makes (an all-reduce of the residual stream [B, C] per block half, the gathers and
reductions the contrast makes) and the bytes a step moves. Writes parallel.json and parallel.md into --out.

    python bench/parallel.py [--model DIR] [--tp 2] [--methods greedy,acd,dola] [--compile] [--out bench/results]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {"greedy": {"method": "greedy"}, "acd": {"method": "acd", "amateur_layer": "auto"},
           "dola": {"method": "dola", "dola_layers": "low"}}
PROMPT = "The history of the printing press begins"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_bytes(cfg, B: int, tp: int, method: str, layers: int, act: int, candidates: int = 64) -> dict:
    """Bytes one rank sends in one decode step's collectives (ring algorithms), from the shapes: the blocks'
    all-reduces of the residual stream (`act` bytes an element) and the contrast's float32 gathers and sums."""
    C, V = cfg.dim, cfg.vocab_size
    rows = -(-V // tp)
    share = (tp - 1) / tp  # a ring moves this share of the data per rank, twice for an all-reduce
    blocks = 2 * cfg.n_layers * 2 * share * B * C * act
    if method == "dola":
        contrast = (share * tp * 2 * (1 + layers) * B + 2 * share * layers * B) * 4 + share * tp * 2 * B * rows * 4
    else:
        contrast = share * tp * B * rows * 4 + (2 * share * B * candidates * 4 if method == "acd" else 0)
    return {"blocks": blocks, "contrast": contrast, "collectives": 2 * cfg.n_layers + (3 if method == "dola" else
                                                                                        1 + (method == "acd"))}


def collective_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t0) / reps


def worker(args) -> None:
    import lcdfast
    from lcdfast import parallel

    engine = lcdfast.load(args.model, tp=args.tp, compile=True if args.compile else False)
    out = {"tp": args.tp, "threads": torch.get_num_threads(), "methods": {}}
    for name in args.methods.split(","):
        options = METHODS[name]
        engine.generate(PROMPT, max_new_tokens=8, **options)  # warm-up (and compile)
        best = None
        for _ in range(args.repeats):
            g = engine.generate(PROMPT, max_new_tokens=args.tokens, **options)[0]
            ms = 1000 * g.stats["decode_seconds"] / max(1, g.stats["decode_steps"])
            best = ms if best is None else min(best, ms)
        dc = engine.decode_config(**options)
        out["methods"][name] = {"decode_ms": best, "tokens": g.token_ids, "exit_layers": list(dc.exit_layers),
                                "compiled": g.stats["compiled"]}
    if args.tp > 1:
        import torch.distributed as dist

        cfg, group = engine.model.config, dist.group.WORLD
        stream = torch.randn(1, 1, cfg.dim)
        logits = torch.randn(1, engine.model.vocab_shard.rows)
        out["collectives_us"] = {
            "all-reduce [1, C]": collective_us(lambda: parallel.all_reduce(stream, group)),
            "gather [1, V]": collective_us(lambda: parallel.gather_vocab(logits, engine.model.vocab_shard)),
            "all-reduce [1, 64]": collective_us(lambda: parallel.all_reduce(torch.randn(1, 64), group)),
        }
        act = torch.empty(0, dtype=engine.model.dtype).element_size()
        out["step_bytes"] = {name: step_bytes(cfg, 1, args.tp, name, len(m["exit_layers"]), act)
                             for name, m in out["methods"].items()}
    if parallel.is_main():
        Path(args.result).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--methods", default="greedy,acd,dola")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile the decode step (both sides)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    common = [__file__, "--worker", "--methods", args.methods, "--tokens", str(args.tokens), "--repeats",
              str(args.repeats), *(["--compile"] if args.compile else []), *(["--model", args.model] if args.model
                                                                             else [])]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tp, launch, threads in (
                ("one process", 1, [sys.executable], args.tp),
                (f"--tp {args.tp}", args.tp, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={args.tp}"], 1)):
            result = Path(tmp) / f"{tp}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run([*launch, *common, "--tp", str(tp), "--result", str(result)], check=True, env=env)
            runs[label] = json.loads(result.read_text())
    one, split = runs["one process"], runs[f"--tp {args.tp}"]
    report = {"cpu": cpu_name(), "torch": torch.__version__, "model": args.model or "bundled SmolLM2-135M-Instruct",
              "tp": args.tp, "compiled": args.compile, "runs": runs,
              "same_tokens": {m: one["methods"][m]["tokens"] == split["methods"][m]["tokens"] for m in one["methods"]}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# tensor parallel on {report['cpu']} (torch {report['torch']}, "
             f"{'compiled' if args.compile else 'eager'})", "",
             f"| method | one process ({one['threads']} threads) ms/token | --tp {args.tp} (1 thread each) ms/token | "
             "ratio | same tokens | collectives/step | KB/step (blocks + contrast) |", "|---|---|---|---|---|---|---|"]
    for m in one["methods"]:
        a, b, sb = one["methods"][m]["decode_ms"], split["methods"][m]["decode_ms"], split["step_bytes"][m]
        lines.append(f"| {m} | {a:.1f} | {b:.1f} | {b / a:.2f} | {report['same_tokens'][m]} | {sb['collectives']} | "
                     f"{sb['blocks'] / 1e3:.1f} + {sb['contrast'] / 1e3:.1f} |")
    lines += ["", "| collective (gloo, per call) | us |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in split["collectives_us"].items()]
    (out / "parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
