"""Accuracy of the quantized modes against float32 on held-out text: top-1 agreement and perplexity.

For each passage (Wikinews references from ../shared/data, human text the model was not fitted on): the float32
model's and each mode's next-token prediction at every position (top-1 agreement: the fraction where their argmax
is the same token), and the perplexity of the passage after its first 8 words from the scoring API
(`Engine.score`: exp of minus the mean log-likelihood per continuation token). Writes results.json and prints a
table.

    python bench/quantized.py [--model DIR] [--modes int8,int8:32,int4,int4:64,gguf] [--passages 200]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import lcdfast

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "open-ended" / "wikinews.jsonl"


def passages(path: Path, n: int) -> list[str]:
    texts = [json.loads(line)["reference"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [t for t in texts if len(t.split()) >= 40][:n]


@torch.inference_mode()
def top1(engine, text: str, max_tokens: int = 256) -> torch.Tensor:
    """The model's argmax next token at every position of `text` (its first max_tokens tokens): [T]."""
    ids = torch.tensor([engine.tokenizer.encode(text)[:max_tokens]])
    model = engine.model
    model.setup_caches(1, ids.shape[1])
    final, _ = model(ids, torch.arange(ids.shape[1]), torch.zeros(1, dtype=torch.long))
    return model.logits(final)[0].argmax(-1)


def perplexity(engine, texts: list[str]) -> float:
    prompts = [" ".join(t.split()[:8]) for t in texts]
    rests = [t[len(p):] for t, p in zip(texts, prompts)]
    scores = engine.score(prompts, rests, batch_size=8)
    tokens = sum(len(engine.tokenizer.encode(p + r)) - len(engine.tokenizer.encode(p)) for p, r in zip(prompts, rests))
    return math.exp(-sum(scores) / tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: bundled SmolLM2-135M)")
    p.add_argument("--modes", default="int8,int8:32,int4,int4:64,gguf")
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default="bench/results_quantized")
    args = p.parse_args(argv)
    texts = passages(Path(args.data), args.passages)
    results = {"model": args.model or "bundled SmolLM2-135M-Instruct", "data": args.data, "passages": len(texts),
               "modes": {}}
    reference, out = None, Path(args.out)
    for mode in ["float32", *args.modes.split(",")]:
        t0 = time.perf_counter()
        engine = lcdfast.load(args.model, quantize=None if mode == "float32" else mode, compile=False)
        predicted = [top1(engine, t) for t in texts]
        row = {"weight_mb": engine.model.weight_bytes / 1e6, "perplexity": perplexity(engine, texts)}
        if reference is None:
            reference = predicted
        same = sum(int((a == b).sum()) for a, b in zip(predicted, reference))
        row["top1_agreement"] = same / sum(len(a) for a in reference)
        row["perplexity_change"] = row["perplexity"] / results["modes"].get("float32", row)["perplexity"] - 1
        row["seconds"] = time.perf_counter() - t0
        results["modes"][mode] = row
        print(f"{mode}: {row}", file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))  # after each mode: a cut run keeps them
        del engine
    lines = [f"{len(texts)} Wikinews passages ({args.data}), top-1 agreement with float32 at every position of the "
             "first 256 tokens; perplexity after the first 8 words (scoring API)", "",
             "| weights | MB | top-1 agreement | perplexity | vs float32 |", "|---|---:|---:|---:|---:|"]
    for mode, row in results["modes"].items():
        lines.append(f"| {mode} | {row['weight_mb']:.0f} | {row['top1_agreement']:.1%} | {row['perplexity']:.2f} "
                     f"| {row['perplexity_change']:+.2%} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
