"""lcdfast bench: decode speed of every method, lcdfast compiled and eager against transformers 4.51.

One run, one machine: prefill and decode tokens/s per (weights, batch, method, engine), ratios to
transformers and to lcdfast greedy, the floors (weight bytes over the measured streaming-read bandwidth, over the
copy bandwidth, and the bare chain of the same matrix products), compile warm-up and peak memory reported apart.
Weights are a dtype (float32, bfloat16) or a quantization (int8, int4, ... with float32 activations; gguf: the
bundled GGUF's own Q4_1 / Q8_0 blocks; any of them +a8: int8 activations too), and llama.cpp (llama-cpp-python,
the `bench` extra) decodes the same GGUF with the same threads, greedy, batch 1, as a row of each gguf block. The
CPU's model and vector extensions are recorded. Writes results.json, results.md and results.png into --out.

    python bench/bench.py [--quick] [--model DIR] [--dtypes float32,int8,int4,gguf] [--out bench/results]
"""

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lcdfast
from lcdfast import kernels
from lcdfast.checkpoint import DTYPES
from lcdfast.model import Linear, QuantLinear, linear

PROMPTS = [
    "The history of the printing press begins",
    "In a small village at the foot of the mountains, an old clockmaker",
    "Photosynthesis is the process by which green plants",
    "The stock market fell sharply on Monday after",
    "Alan Turing was a British mathematician who",
    "The recipe calls for two cups of flour and",
    "Scientists have discovered a new species of frog in",
    "The first thing you notice when you enter the museum is",
]
METHODS = {  # name -> generate() options
    "greedy": dict(method="greedy"),
    "sample": dict(method="sample", temperature=0.8, top_p=0.95),
    "acd": dict(method="acd"),
    "dola-high": dict(method="dola", dola_layers="high", repetition_penalty=1.2),
    "dola-low": dict(method="dola", dola_layers="low", repetition_penalty=1.2),
    "cd": dict(method="cd"),
}
HF_METHODS = {  # transformers 4.51 generate() options for the methods it has
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_p=0.95),
    "dola-high": dict(do_sample=False, dola_layers="high", repetition_penalty=1.2),
    "dola-low": dict(do_sample=False, dola_layers="low", repetition_penalty=1.2),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def truncated_amateur(model_dir: Path, n_layers: int, out_dir: Path) -> Path:
    """CD's amateur for the bench: the checkpoint's first `n_layers` blocks with its own head and tokenizer."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = n_layers
    tensors = load_file(str(model_dir / "model.safetensors"))
    keep = {k: v for k, v in tensors.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"):
        if (model_dir / name).is_file():
            (out_dir / name).write_bytes((model_dir / name).read_bytes())
    return out_dir


def best_seconds(op, runs: int = 10) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth() -> float:
    """Bytes per second moved by a large tensor copy (each byte counted once), best of 10."""
    src = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB
    dst = torch.empty_like(src)
    return src.numel() * 4 / best_seconds(lambda: dst.copy_(src))


def read_bandwidth() -> float:
    """Bytes per second a streaming read reaches (a sum over 256 MiB: reads only, no writes), best of 10."""
    src = torch.ones(64 * 2**20, dtype=torch.float32)
    return src.numel() * 4 / best_seconds(src.sum)


def cpu_info() -> dict:
    """The CPU's model name and the vector extensions that matter here (Linux /proc/cpuinfo; else what platform has)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor(), "extensions": []}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")
    return {"model": model, "cores": len([ln for ln in text.splitlines() if ln.startswith("processor")]),
            "extensions": [f for f in wanted if f in flags]}


def llama_cpp_run(llm, prompt: str, new_tokens: int) -> dict:
    """llama.cpp on the same GGUF: the prompt's evaluation (prefill), then greedy decoding one token at a time."""
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    llm.reset()
    t = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([llm.sample(top_k=1, temp=0.0)])
    decode = (time.perf_counter() - t) / max(new_tokens - 1, 1)
    return {"prefill_tok_s": len(tokens) / prefill, "decode_tok_s": 1 / decode, "decode_ms_per_step": 1000 * decode}


def load_llama_cpp(gguf: Path, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        print(f"bench: no llama.cpp row ({e}; pip install -e '.[bench]')", file=sys.stderr)
        return None
    return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                 verbose=False)


def matmul_chains(model, batch: int) -> dict:
    """The bare matrix products of one decode step (every Linear incl. the LM head, same weights) as timed
    callables. "blas" (F.linear) and "compiled" (the `linear` the decode step runs: inductor's reduction, or
    csrc's skinny_linear when it is on and rows > 1) run them in forward order, each fed the previous one's
    output, as in a step: the matmul floor is the faster of the two. "independent" gives them all the same
    inputs, so inductor fuses same-shaped products side by side into one loop (several weight streams and
    accumulators at once), which no step can do: reported for reference, not a floor."""
    weights = [m.weight for m in model.modules() if isinstance(m, Linear | QuantLinear)]
    x0 = torch.randn(batch, weights[0].shape[1], dtype=model.dtype)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=model.dtype) for w in weights}

    def fit(y: torch.Tensor, width: int) -> torch.Tensor:  # [B, n] -> [B, width]: cut or zero-pad
        return y[:, :width] if y.shape[1] >= width else torch.nn.functional.pad(y, (0, width - y.shape[1]))

    def dependent(product):
        def run() -> torch.Tensor:
            y = x0
            for w in weights:
                y = product(fit(y, w.shape[1]), w)
            return y
        return run

    def independent() -> list:
        return [linear(xs[w.shape[1]], w) for w in weights]

    blas = linear if model.quantization else torch.nn.functional.linear  # quantized: eager (csrc's op when on)
    return {"blas": dependent(blas),
            "compiled": torch.compile(dependent(linear), fullgraph=True),
            "independent": torch.compile(independent, fullgraph=True)}


@torch.inference_mode()
def chain_ms(chains: dict, calls: int) -> dict:
    """Each chain's mean ms over `calls` back-to-back calls (after 3 warm-up calls), timed as a decode's steps are:
    the mean over a run, not the luckiest single call (on a machine whose bandwidth drifts, that minimum sat
    7-10% below a sustained run of the same products and so understated the floor fraction)."""
    out = {}
    for name, fn in chains.items():
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out[name] = 1000 * (time.perf_counter() - t) / calls
    return out


def lcdfast_run(engine, prompts, options, new_tokens) -> dict:
    stats = engine.generate(prompts, max_new_tokens=new_tokens, batch_size=len(prompts), **options)[0].stats
    B, T, steps = stats["batch"], stats["prompt_tokens"], max(stats["decode_steps"], 1)
    return {"prefill_tok_s": B * T / stats["prefill_seconds"], "decode_tok_s": B * steps / stats["decode_seconds"],
            "decode_ms_per_step": 1000 * stats["decode_seconds"] / steps}


@torch.inference_mode()
def transformers_run(hf, tok, prompts, options, new_tokens) -> dict:
    """Prefill from a one-token generate, decode from the rest of a `new_tokens` one (EOS off)."""
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    kwargs = dict(pad_token_id=tok.pad_token_id, eos_token_id=None, **options)
    torch.manual_seed(0)
    t = time.perf_counter()
    hf.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    hf.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    decode = max(time.perf_counter() - t - prefill, 1e-9) / max(new_tokens - 1, 1)
    B, T = enc.input_ids.shape
    return {"prefill_tok_s": B * T / prefill, "decode_tok_s": B / decode, "decode_ms_per_step": 1000 * decode}


def best_run(runs: list[dict]) -> dict:
    """The fastest decode of the rounds, with every round's ms/step and the compiled chain timed just before it."""
    best = min(runs, key=lambda r: r["decode_ms_per_step"])
    rounds = [{"decode_ms": r["decode_ms_per_step"], "floor_ms": r["floor_ms"]} for r in runs]
    return {**{k: v for k, v in best.items() if k != "floor_ms"}, "rounds": rounds}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def load_transformers(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    return hf, tok


def markdown(results: dict) -> str:
    cpu = results.get("cpu", {})
    lines = [f"{cpu.get('model', '?')} ({' '.join(cpu.get('extensions', []))}); torch {results['torch']}, "
             f"{results['threads']} threads, {results['cpu_capability']}; csrc ops "
             + ("on" if results["csrc"] else "off") + f"; {results['new_tokens']} new tokens"]
    for key, block in results["runs"].items():
        floors = block["floors"]
        lines.append(f"\n### {key}\n")
        lines.append(f"floors: {floors['weight_mb']:.0f} MB of weights; streaming read {floors['read_floor_ms']:.1f} "
                     f"ms/step ({floors['read_bandwidth_gb_s']:.1f} GB/s); copy bandwidth "
                     f"{floors['copy_floor_ms']:.1f} ms/step; matmul chain "
                     f"{floors['matmul_floor_ms']:.1f} ms/step (compiled {floors['compiled_chain_ms']:.1f}, "
                     f"BLAS {floors['blas_chain_ms']:.1f}; the same products independent, fused side by side: "
                     f"{floors['independent_chain_ms']:.1f}). Matmul floor reached: each round's decode against "
                     "the compiled chain timed right before it, median over the rounds\n")
        reference = block.get("reference", "transformers")
        lines.append(f"| method | engine | prefill tok/s | decode tok/s | ms/step | vs {reference} | vs lcdfast greedy "
                     "| matmul floor reached |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in block["rows"]:
            fmt = lambda x, spec: "-" if x is None else format(x, spec)
            lines.append(f"| {row['method']} | {row['engine']} | {row['prefill_tok_s']:.0f} "
                         f"| {row['decode_tok_s']:.1f} "
                         f"| {row['decode_ms_per_step']:.1f} | {fmt(row.get('vs_transformers'), '.2f')}x "
                         f"| {fmt(row.get('vs_greedy'), '.2f')}x | {fmt(row.get('floor_fraction'), '.0%')} |")
        lines.append("\ncompile warm-up: " + ", ".join(f"{k} {v:.0f}s" for k, v in block["warmup_s"].items()))
    lines.append(f"\npeak RSS {results['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart (pip install matplotlib)", file=sys.stderr)
        return
    blocks = list(results["runs"].items())
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for ax, (key, block) in zip(axes[0], blocks):
        engines = ["lcdfast compiled", "lcdfast eager", "transformers", "llama.cpp"]
        methods = list(dict.fromkeys(r["method"] for r in block["rows"]))
        width = 0.2
        for k, engine in enumerate(engines):
            vals = [next((r["decode_tok_s"] for r in block["rows"] if r["method"] == m and r["engine"] == engine), 0)
                    for m in methods]
            ax.bar([i + (k - 1.5) * width for i in range(len(methods))], vals, width, label=engine)
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_title(key)
        ax.set_ylabel("decode tokens/s")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: bundled SmolLM2-135M)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="float32, batch 1, 32 tokens, greedy/acd/dola-high")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="weights: float32 | bfloat16 | int8 | int8:G | int4 | int4:G | gguf, each quantized one "
                        "optionally +a8 (int8 activations), comma-separated")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--no-csrc", action="store_true", help="leave csrc/'s C++ ops off (default: build and use them)")
    p.add_argument("--gguf", default=None, help="the GGUF llama.cpp decodes (default: the bundled one)")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--exit-heads", default=None,
                   help="a fit-lens or train-heads file: adds the rows acd+heads and dola-high+heads, read through it")
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes, args.batches, args.new_tokens, args.methods, args.repeats = \
            "float32", "1", 32, "greedy,acd,dola-high", 2
    if args.model:
        model_dir = Path(args.model)
    else:
        from lcdfast.convert import default_model_dir

        model_dir = default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if args.exit_heads:
        for m in ("acd", "dola-high"):
            METHODS[f"{m}+heads"] = {**METHODS[m], "exit_heads": args.exit_heads}
            methods += [f"{m}+heads"] if m in methods else []
    for m in methods:
        if m not in METHODS:
            sys.exit(f"bench: --methods: '{m}' unknown (expected {', '.join(METHODS)})")
    torch._dynamo.config.recompile_limit = 64
    csrc = not args.no_csrc and kernels.enable()  # one line on stderr if they can't be built
    amateur_dir = truncated_amateur(model_dir, 6, Path(tempfile.mkdtemp())) if "cd" in methods else None
    results = {"model": str(model_dir), "new_tokens": args.new_tokens, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "csrc": csrc, "cpu": cpu_info(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    for dtype in args.dtypes.split(","):
        quantize = dtype if dtype not in DTYPES else ""
        engine = lcdfast.load(model_dir, dtype="float32" if quantize else dtype, quantize=quantize)
        if amateur_dir:
            engine.set_amateur(amateur_dir)
        weight_bytes = engine.model.weight_bytes
        hf = tok = None
        if not args.no_transformers and not quantize:
            hf, tok = load_transformers(model_dir, DTYPES[dtype])
        llm = None
        if quantize.startswith("gguf") and not args.no_llama_cpp:  # gguf and gguf+a8: the same file
            from lcdfast.convert import bundled_gguf

            llm = load_llama_cpp(Path(args.gguf) if args.gguf else bundled_gguf(), torch.get_num_threads())
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
            key = f"{dtype} batch {batch}"
            chains = matmul_chains(engine.model, batch)
            # Compile every method first, then time in rounds that visit each (method, engine) once, so the
            # drift of a shared machine's memory bandwidth spreads over all of them rather than a few.
            steps, warmup, contenders = {}, {}, []
            for method in methods:
                engine.enable_compile()
                t = time.perf_counter()
                engine.generate(prompts, max_new_tokens=2, batch_size=batch, **METHODS[method])
                warmup[method], steps[method] = time.perf_counter() - t, engine.compiled_step
                contenders += [(method, "lcdfast compiled")] + [(method, "lcdfast eager")] * (not args.no_eager)
                contenders += [(method, "transformers")] * (hf is not None and method in HF_METHODS)
                contenders += [(method, "llama.cpp")] * (llm is not None and method == "greedy" and batch == 1)
            runs, chain_runs, bandwidths, reads = {c: [] for c in contenders}, [], [], []
            calls = max(args.new_tokens - 1, 1)
            for r in range(args.repeats + 1):  # round 0 warms caches, the allocator and transformers' first call
                print(f"{key}: round {r} of {args.repeats}", file=sys.stderr, flush=True)
                for method, engine_name in contenders:
                    # the floor again right before each run, over as many calls: the run's fraction of it is
                    # measured at the same bandwidth (it drifts by +-20% over minutes on a shared machine)
                    floor_ms = chain_ms({"compiled": chains["compiled"]}, calls)["compiled"] if r else None
                    if engine_name == "llama.cpp":
                        run = llama_cpp_run(llm, prompts[0], args.new_tokens if r else 8)
                    elif engine_name == "transformers":
                        run = transformers_run(hf, tok, prompts, HF_METHODS[method], args.new_tokens if r else 8)
                    else:
                        compiled = engine_name == "lcdfast compiled"
                        engine.compiled_step, engine.compile_mode = (steps[method], "on") if compiled else (None, "off")
                        run = lcdfast_run(engine, prompts, METHODS[method], args.new_tokens if r else 8)
                    if r:
                        runs[(method, engine_name)].append({**run, "floor_ms": floor_ms})
                # the floors are timed in the rounds too, over as many calls as the decode has steps; best round wins
                chain_runs.append(chain_ms(chains, calls))
                bandwidths.append(copy_bandwidth())
                reads.append(read_bandwidth())
            chain_best = {name: min(c[name] for c in chain_runs) for name in chains}
            floors = {"weight_mb": weight_bytes / 1e6, "read_bandwidth_gb_s": max(reads) / 1e9,
                      "read_floor_ms": 1000 * weight_bytes / max(reads), "copy_bandwidth_gb_s": max(bandwidths) / 1e9,
                      "copy_floor_ms": 1000 * weight_bytes / max(bandwidths),
                      "blas_chain_ms": chain_best["blas"], "compiled_chain_ms": chain_best["compiled"],
                      "independent_chain_ms": chain_best["independent"],
                      "matmul_floor_ms": min(chain_best["blas"], chain_best["compiled"])}
            rows = [{"method": m, "engine": e, **best_run(runs[(m, e)])} for m, e in contenders]
            for row in rows:
                ref = next((r for r in rows if r["engine"] in ("transformers", "llama.cpp")
                            and r["method"] == row["method"]), None)
                greedy = next((r for r in rows if r["engine"] == row["engine"] and r["method"] == "greedy"), None)
                row["vs_transformers"] = row["decode_tok_s"] / ref["decode_tok_s"] if ref else None
                row["vs_greedy"] = row["decode_tok_s"] / greedy["decode_tok_s"] if greedy else None
                row["floor_fraction"] = median([r["floor_ms"] / r["decode_ms"] for r in row["rounds"]])
            results["runs"][key] = {"floors": floors, "rows": rows, "warmup_s": warmup,
                                    "reference": "llama.cpp" if llm is not None else "transformers"}
        engine.compiled_step = None
        del engine, hf, llm
    results["peak_rss_mb"] = peak_rss_mb()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    chart(results, out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
