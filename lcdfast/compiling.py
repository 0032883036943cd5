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

On CPU a compiled step is also saved whole (SavedStep: Dynamo's output with inductor's, in
$LCDFAST_HOME/compile/steps), so a later process loads it in a few seconds (LOAD_PRIOR_S until measured) instead
of tracing it again.
"""

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .convert import lcdfast_home

COLD_PRIOR_S = 60.0  # first compile of a step: 8-100 s measured on 2 CPU cores
WARM_FRACTION = 0.2  # warm-cache compile / cold compile (11 of 72 s measured for SmolLM2's greedy step)
PRIOR_BANDWIDTH = 10e9  # bytes/s an eager CPU step reads its weights at, before one is measured
SAVING_PRIOR = {"cpu": 0.3, "cuda": 0.8}  # share of an eager step compiling saves, before it is measured
LOAD_PRIOR_S = 4.0  # loading a saved step (SavedStep): 2-3.5 s measured on 2 CPU cores, before it is measured
KEEP = 256  # the most recently run steps kept in timings.json
KEEP_SAVED = 48  # the most recently used saved steps kept in compile/steps (~5 MB each for SmolLM2)
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


def expected_costs(record: dict, device: str, weight_bytes: int, saved: bool = False) -> tuple[float, float]:
    """(seconds a compile of this step is expected to take, milliseconds it is expected to save a step).
    `saved`: the step is saved (SavedStep), so "compiling" it is loading it."""
    if saved:
        compile_s = record.get("load_s", LOAD_PRIOR_S)
    elif "warm_s" in record:
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


@functools.cache
def sources_digest() -> str:
    """torch's version and lcdfast's own sources (csrc's too): a saved step is reused only by the code that saved
    it, since it holds the bytecode Dynamo made of that code."""
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parent
    for f in sorted([*root.glob("*.py"), *(root.parent / "csrc").glob("*")]):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def saved_step_path(key: str, model_dir: Path) -> Path:
    """The file a step is saved in: by its step_key, the code that compiles it, and the model's weight files (their
    names, sizes and times; a step's graph is specialized on how they load, e.g. a head tied to the embedding)."""
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(model_dir.glob("*.safetensors"))]
    name = hashlib.sha256(f"{key} {sources_digest()} {files}".encode()).hexdigest()[:24]
    return compile_home() / "steps" / f"{name}.bin"


def portable_guards(entries) -> list[bool]:
    """torch.compile's guard_filter_fn for a saved step: the guards a file can carry (tensors' shapes, dtypes and
    strides, the step's constants); not those on object identities or globals, which no later process shares."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaveable = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (g.is_global or "__import__(" in g.name or g.guard_type in unsaveable
                 or any(t in unsaveable for t in g.derived_guard_types)) for g in entries]


def _unmarked(args: tuple) -> tuple:
    """`args` with each tensor marked dynamic (torch._dynamo.maybe_mark_dynamic) as a fresh view without the mark: a
    loaded step's guards (torch 2.13) refuse the mark although the step was compiled with it."""
    return tuple(a[...] if isinstance(a, torch.Tensor) and hasattr(a, "_has_dynamo_dim_marking") else a for a in args)


class SavedStep:
    """The decode step for one step_key, compiled ahead of time (torch.compile(...).aot_compile: Dynamo's bytecode
    and guards with inductor's graph) and kept in `path`, so that a later process loads it (2-3.5 s here) instead
    of tracing the step again with Dynamo (~7 s; and inductor caches no graph with torch.cond, so ACD's and top-p's
    steps would compile in full, ~40 s). The compiled kernels' binaries stay in inductor's cache
    ($LCDFAST_HOME/compile/inductor): without it a load compiles them again. The file is a pickle that lcdfast
    writes and reads, as inductor's own caches are; never a model file.

    The first call compiles and saves the step, or loads the file; the guards are checked on the first call after
    each `recheck()` (a generation's first step: ~0.5 ms, too dear for every step), and a step whose guards fail is
    compiled again. Anything failing there falls back to `fallback` (the in-process torch.compile), said once."""

    def __init__(self, step: Callable, path: Path, fallback: Callable, notice: Callable[[str], None]) -> None:
        self.step, self.path, self.fallback, self.notice = step, path, fallback, notice
        self.fn = None
        self.check = True
        self.loaded = False  # this process found the step in its file
        self.failed = False

    def recheck(self) -> None:
        self.check = True

    def __call__(self, *args):
        if not self.check:
            return self.fn(*_unmarked(args))
        if self.failed:
            return self.fallback(*args)
        try:
            if self.fn is None and self.path.exists():
                self.fn = self._load()
                self.loaded = self.fn is not None
            if self.fn is not None and not self.fn.guard_check(*_unmarked(args)):
                self.fn, self.loaded = None, False
            if self.fn is None:
                self.fn = self._compile(args)
            out = self.fn(*_unmarked(args))
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the in-process compile
            self.failed, self.fn = True, None
            self.notice(f"the compiled step can't be saved or loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); compiling it in this process only")
            return self.fallback(*args)
        self.check = False
        return out

    def _load(self):
        from torch._guards import TracingContext, tracing

        try:
            # torch 2.13's guard state unpickles sources that install guards, which needs a tracing context
            with self.path.open("rb") as f, tracing(TracingContext(None)):
                fn = torch.compiler.load_compiled_function(f)
        except Exception as e:  # noqa: BLE001 - a torn, stale or foreign file: compile again
            self.notice(f"{self.path}: saved step unreadable ({type(e).__name__}); compiling it again")
            return None
        fn.disable_guard_check()  # checked by __call__, on a generation's first step
        with contextlib.suppress(OSError):
            os.utime(self.path)  # recently used: kept by prune_saved
        return fn

    def _compile(self, args: tuple):
        compiled = torch.compile(self.step, fullgraph=True, dynamic=False, options={"guard_filter_fn": portable_guards})
        fn = compiled.aot_compile((args, {}))
        fn.disable_guard_check()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(self.path))
        except Exception as e:  # noqa: BLE001 - it still runs in this process
            self.notice(f"{self.path}: can't save the compiled step ({type(e).__name__}: {str(e)[:200]})")
        prune_saved(self.path.parent)
        return fn


def prune_saved(folder: Path, keep: int | None = None) -> None:
    """Delete all but the `keep` (KEEP_SAVED) most recently used saved steps in `folder`."""
    try:
        files = sorted(folder.glob("*.bin"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for f in files[KEEP_SAVED if keep is None else keep:]:
            f.unlink(missing_ok=True)
    except OSError:
        pass
