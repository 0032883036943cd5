"""One rank of a tensor-parallel check (tests/test_parallel.py launches it with torchrun): generates with each
method and reads every layer's logits, rank 0 writing them as JSON. `run` also serves the one-rank reference."""

import json
import sys

import lcdfast
from lcdfast import parallel

PROMPTS = ["The quick brown", "Layers improve gradually, layer"]
METHODS = {  # name: generate options
    "greedy": {"method": "greedy"},
    "acd": {"method": "acd", "amateur_layer": 2},
    "acd-full": {"method": "acd", "amateur_layer": 1, "alpha": 1e-4},  # V_head past the 64 candidates: the fallback
    "dola-low": {"method": "dola", "dola_layers": "low"},
    "dola-high": {"method": "dola", "dola_layers": "high", "repetition_penalty": 1.2},
    "dola-batch": {"method": "dola", "dola_layers": "high", "dola_batch_mode": True},
    "sample": {"method": "sample", "top_p": 0.9, "temperature": 0.8},
}


def run(engine, methods: list[str]) -> dict:
    ids = engine.tokenizer.encode(PROMPTS[1])
    out = {"logits": engine.layer_logits(ids, list(range(engine.n_layers + 1))).tolist(), "compiled": {}}
    for name in methods:
        gens = engine.generate(PROMPTS, max_new_tokens=10, **METHODS[name])
        out[name] = [g.token_ids for g in gens]
        out["compiled"][name] = gens[0].stats["compiled"]
    return out


if __name__ == "__main__":
    model_dir, out_path, tp, compiled, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", \
        sys.argv[5].split(",")
    result = run(lcdfast.load(model_dir, tp=tp, compile=compiled), names)
    if parallel.is_main():
        with open(out_path, "w") as f:
            json.dump(result, f)
