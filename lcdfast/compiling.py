"""Whether to compile the decode step for a run, and torch.compile's caches under $LCDFAST_HOME.

A compiled step is faster (CPU: 25-35% a step; CUDA graphs: several times), but compiling costs seconds to a
minute and a half on 2 CPU cores the first time, and still several seconds when inductor's caches are warm
(Dynamo re-traces the step in every process). So a run is compiled only when its steps would win that back:

    compile  if  steps x (eager ms - compiled ms) > expected compile seconds

with the figures measured for this step (model, dtype, device, DecodeConfig, batch and cache size) in earlier
runs and kept in $LCDFAST_HOME/compile/timings.json, and priors until they are: a first compile costs
COLD_PRIOR_S; once one has been (the caches are now warm) WARM_FRACTION of it until a warm one is measured
(all of it for a graph inductor could not cache);
an eager step streams the weights at PRIOR_BANDWIDTH (CPU) and compiling saves SAVING_PRIOR of it.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .convert import lcdfast_home

COLD_PRIOR_S = 60.0  # first compile of a step: 8-100 s measured on 2 CPU cores
WARM_FRACTION = 0.2  # warm-cache compile / cold compile (11 of 72 s measured for SmolLM2's greedy step)
PRIOR_BANDWIDTH = 10e9  # bytes/s an eager CPU step reads its weights at, before one is measured
SAVING_PRIOR = {"cpu": 0.3, "cuda": 0.8}  # share of an eager step compiling saves, before it is measured
KEEP = 256  # the most recently run steps kept in timings.json
RECOMPILE_LIMIT = 128  # graphs Dynamo may make of the step (one per config and batch); its setting is per thread


def compile_home() -> Path:
    return lcdfast_home() / "compile"


def use_cache_dir() -> str | None:
    """inductor's on-disk caches (FX graphs, AOT autograd) in $LCDFAST_HOME/compile/inductor, unless the user chose
    a TORCHINDUCTOR_CACHE_DIR. Call before the first compile: inductor fixes the directory when it first uses it.
    Returns a notice when that directory can't be made (a file in its place): inductor then keeps its default."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return None
    path = compile_home() / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{path}: can't hold the compile caches ({e.strerror or e}); compiling with inductor's own"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return None


def fx_cache_counts() -> tuple[int, int]:
    """How many graphs inductor has found in its FX graph cache in this process, and how many it could not cache
    (torch 2.13 caches no graph with torch.cond, which ACD's masked contrast and top-p sampling use)."""
    from torch._dynamo.utils import counters  # imported only once compiling: it costs a second

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_bypass"]


def step_key(model_dir: Path, dtype: str, device: str, config: object, batch: int, slots: int) -> str:
    """What a compiled step is specialized on, as one string; the model by its config.json's bytes and path."""
    try:
        model = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]
    except OSError:
        model = "?"
    return f"{model_dir.resolve()}#{model} {dtype} {device} B={batch} S={slots} {config!r}"


class StepTimings:
    """Measured eager_ms / compiled_ms per step and cold_s / warm_s per compile, by step_key, in one JSON file.

    Reading or writing may fail (a read-only home, another process's torn write): the priors are used instead and
    nothing is raised, since timings only steer a choice."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or compile_home() / "timings.json"

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict:
        record = self.read().get(key)
        return record if isinstance(record, dict) else {}

    def update(self, key: str, **values: float) -> None:
        data = self.read()
        record = data.pop(key, None)
        data[key] = {**(record if isinstance(record, dict) else {}), **values}  # the newest last
        data = dict(list(data.items())[-KEEP:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
                json.dump(data, f, indent=1)
            os.replace(f.name, self.path)
        except OSError:
            pass


def expected_costs(record: dict, device: str, weight_bytes: int) -> tuple[float, float]:
    """(seconds a compile of this step is expected to take, milliseconds it is expected to save a step)."""
    if "warm_s" in record:
        compile_s = record["warm_s"]
    elif "cold_s" in record:
        compile_s = record["cold_s"] * (1.0 if record.get("uncached") else WARM_FRACTION)
    else:
        compile_s = COLD_PRIOR_S
    eager_ms = record.get("eager_ms", 1000 * weight_bytes / PRIOR_BANDWIDTH)
    if "compiled_ms" in record and "eager_ms" in record:
        saving_ms = record["eager_ms"] - record["compiled_ms"]
    else:
        saving_ms = eager_ms * SAVING_PRIOR.get(device, 0.3)
    return float(compile_s), float(saving_ms)
