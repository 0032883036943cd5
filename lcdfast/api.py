"""The Python API: `lcdfast.load()` -> `Engine` with generate, score, layer_logits and lens."""

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import quant
from .checkpoint import finite, load_model
from .compiling import (
    RECOMPILE_LIMIT,
    SavedStep,
    StepTimings,
    expected_costs,
    fx_cache_counts,
    saved_step_path,
    step_key,
    use_cache_dir,
)
from .errors import LcdError, whole
from .generate import (
    METHODS,
    DecodeConfig,
    Generation,
    Readout,
    ScoreConfig,
    decode_step,
    exit_logits,
    generate_ids,
    generation_slots,
    score_ids,
)
from .heads import ExitHeads, load_exit_heads, shared_head_auto_layer
from .kernels import csrc_on
from .model import Transformer
from .parallel import device_of, init, shard_model
from .tokenizer import StreamDecoder, Tokenizer, releasable


def dola_candidates(dola_layers: str | list[int] | tuple[int, ...], n_layers: int, tied: bool) -> tuple[int, ...]:
    """transformers 4.51's mapping of `dola_layers` ("low", "high", or explicit indices) to candidate layers."""
    if isinstance(dola_layers, str) and dola_layers not in ("low", "high"):
        try:
            dola_layers = [int(x) for x in dola_layers.split(",") if x.strip()]
        except ValueError:
            raise LcdError(f"dola_layers: '{dola_layers}' is not low, high or a comma-separated list of ints") from None
    start = 0 if not tied else 2 if n_layers > 2 else 1 if n_layers == 2 else 0
    if dola_layers == "low":
        if start == n_layers // 2:
            layers = [start]
        else:
            layers = list(range(start, n_layers // 2, 2) if n_layers <= 40 else range(start, 20, 2))
    elif dola_layers == "high":
        layers = list(range(n_layers // 2, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
    else:
        bad = [i for i in dola_layers if not 0 <= i < n_layers]
        if bad:
            raise LcdError(f"dola_layers: layer {bad[0]} outside 0..{n_layers - 1}")
        layers = sorted(set(dola_layers))  # the order the model yields them in, once each
    if not layers:
        raise LcdError(f"dola_layers: no candidate layer left from {dola_layers!r} (allowed 0..{n_layers - 1})")
    return tuple(layers)


def real(name: str, value) -> float:
    """`value` as a float if it is a number, else an LcdError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LcdError(f"{name}: {value!r} must be a number")
    return float(value)


class Engine:
    """A loaded model, its tokenizer and options; every CLI command is a call on this."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_dir: Path, max_seq_len: int = 4096) -> None:
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        cfg = model.config
        self.max_seq_len = min(max_seq_len, cfg.max_positions) if cfg.positions == "learned" else max_seq_len
        self.amateur: Transformer | None = None
        self.amateur_dir: Path | None = None
        self.exit_heads: ExitHeads | None = None  # --exit-heads: fitted lenses or trained heads per layer
        self._readouts: dict[tuple, Readout] = {}
        self._files: dict[str, ExitHeads] = {}  # exit heads' files read so far, by path
        self.compile_mode = "auto"  # "auto": when it pays off (compiling.py) | "on" | "off"
        self.compiled_step: Callable | None = None  # torch.compile(decode_step), made when first needed
        self.compile_failed = False  # it raised once: eager from then on
        self._compile_options: str | None = None
        self.compiled_keys: set[str] = set()  # steps this process has compiled (or tried to)
        self.saved_steps: dict[str, SavedStep] = {}  # CPU: the steps compiled ahead of time, by step key
        self.timings = StepTimings()
        # the context a first compile runs in (the CLI shows a status line); `notices` said once each on stderr
        self.compile_status: Callable[..., contextlib.AbstractContextManager] = \
            lambda label, loads=False: contextlib.nullcontext()
        self.notices: set[str] = set()
        self.prefix_cache: dict = {}  # scoring: the last shared prompt prefix's K/V per model
        self.eos_ids = sorted(set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids))

    @property
    def n_layers(self) -> int:
        return self.model.config.n_layers

    def set_amateur(self, path: str | Path) -> None:
        """CD's separate amateur model: same vocabulary required; it keeps its own KV cache."""
        if not isinstance(path, str | Path):
            raise LcdError(f"amateur model: expected a directory path, got {path!r}")
        mode = self.model.quantization  # the amateur's own GGUF blocks, or its float weights as the expert's are
        amateur = load_model(path, self.model.dtype, self.model.device,
                             None if quant.split_a8(mode)[0] in ("", "gguf") else mode)
        if amateur.config.vocab_size != self.model.config.vocab_size:
            raise LcdError(f"--amateur-model {path}: vocab_size {amateur.config.vocab_size} differs from the "
                           f"expert's {self.model.config.vocab_size}")
        self.amateur, self.amateur_dir = amateur, Path(path).resolve()

    def set_exit_heads(self, path: str | Path | None) -> None:
        """Read the exit layers through a file's lenses or trained heads (heads.py); None: the shared head again."""
        self.exit_heads = None if path is None else self.read_exit_heads(path)

    def read_exit_heads(self, path: str | Path) -> ExitHeads:
        """An exit heads' file for this model (heads.load_exit_heads), read once per path."""
        key = str(Path(path).resolve())
        if key not in self._files:
            self._files[key] = load_exit_heads(path, self.model)
        return self._files[key]

    def enable_compile(self, mode: str | None = None) -> None:
        """Compile the decode step for every run from now on (fullgraph, static shapes; CUDA graphs on a GPU), not
        only where it pays off; eager stays the fallback. `mode`: torch.compile's."""
        self.compile_mode, self._compile_options = "on", mode

    def _use_cache_dir(self) -> None:
        notice = use_cache_dir()
        if notice:
            self._say_once("cache", notice)

    def _compiled(self) -> Callable | None:
        """The in-process compiled step, made on first use (torch.compile imports Dynamo: ~2 s, which a run whose
        step loads from its file does without until after its first token); None once it failed."""
        if self.compiled_step is None and not self.compile_failed:
            self._use_cache_dir()
            mode = self._compile_options or ("reduce-overhead" if self.model.device.type == "cuda" else None)
            self.compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
        return self.compiled_step

    def _say_once(self, kind: str, text: str) -> None:
        if kind not in self.notices:
            self.notices.add(kind)
            print(f"lcdfast: {text}", file=sys.stderr)

    def _plan_step(self, dc: DecodeConfig, batch: int, slots: int, steps: int) -> tuple[Callable, str, bool]:
        """The step a run uses (compiled or eager), its timing key, and whether it compiles first (a new graph)."""
        model = self.model
        weights = str(model.dtype).removeprefix("torch.") + (f"-{model.quantization}" if model.quantization else "")
        weights += f"-tp{self.model.vocab_shard.group.size()}" if self.model.vocab_shard is not None else ""
        if dc.method == "cd" and self.amateur is not None:
            weights += f" amateur={self.amateur_dir}"
        key = step_key(self.model_dir, weights, model.device.type, dc, batch, slots)
        if self.compile_mode == "off" or steps < 1:  # no decode step to compile
            return decode_step, key, False
        # CPU, one rank: the step is saved whole once compiled, so a later process loads it (compiling.SavedStep)
        path = saved_step_path(f"{key} csrc={csrc_on(model.device)}", self.model_dir) \
            if model.device.type == "cpu" and model.vocab_shard is None else None
        # quantized weights without csrc's products: an eager step dequantizes every weight, so always compile
        eager_dequantizes = bool(model.quantization) and not csrc_on(model.device)
        if self.compile_mode == "auto" and key not in self.compiled_keys and not eager_dequantizes:
            saved = path is not None and path.exists()
            compile_s, saving_ms = expected_costs(self.timings.get(key), model.device.type, model.weight_bytes, saved)
            if steps * saving_ms / 1000 <= compile_s:
                verb = "loading the compiled step" if saved else "compiling the step"
                self._say_once("eager", f"decoding eagerly: {verb} would take ~{compile_s:.0f}s to save "
                               f"~{saving_ms:.1f} ms on each of {steps} steps (--compile to compile anyway)")
                return decode_step, key, False
        first = key not in self.compiled_keys
        self.compiled_keys.add(key)
        if path is None:
            self._compiled()
            return self._step, key, first
        self._use_cache_dir()  # before the step loads: its kernels' binaries are in inductor's cache
        if key not in self.saved_steps:
            self.saved_steps[key] = SavedStep(decode_step, path, self._step, lambda text: self._say_once(key, text))
        step = self.saved_steps[key]
        step.recheck()
        return step, key, first

    def _step(self, *args):
        """The compiled step, or eager if compiling fails (said once; compilation fails before any state changes)."""
        compiled = self._compiled()
        if compiled is not None:
            if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:  # per thread: set on whichever thread steps
                torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the reference path
                print(f"lcdfast: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "decoding eagerly", file=sys.stderr)
                self.compiled_step, self.compile_failed = None, True
        return decode_step(*args)

    def _readout(self, layers: tuple[int, ...], path: str) -> Readout | None:
        """File `path`'s tensors for `layers` ("": the shared head), stacked once; LcdError for a layer it lacks."""
        if not path or not layers:
            return None
        heads = self.read_exit_heads(path)
        if (layers, path) not in self._readouts:
            missing = [j for j in layers if j not in heads.layers]
            if missing:
                raise LcdError(f"--exit-heads {heads.path}: no {heads.kind} for layer {missing[0]} (the file has "
                               f"layers {','.join(map(str, heads.layers))})")
            if heads.kind == "lens":
                readout = Readout(None, torch.stack([heads.lens[j][0] for j in layers]),
                                  torch.stack([heads.lens[j][1] for j in layers]))
            else:
                readout = Readout(torch.stack([heads.heads[j] for j in layers]))
            self._readouts[layers, path] = readout
        return self._readouts[layers, path]

    def _score_readout(self, sc: ScoreConfig) -> Readout | None:
        return self._readout(sc.exit_layers, sc.exit_heads)

    def auto_layer(self, heads: ExitHeads | None = None) -> int:
        """`amateur_layer="auto"`: the layer heads.auto_layer chose for this model when the exit heads' file was
        made (from held-out statistics, heads.py), else the one it chooses for the shared head on the model's
        own text (computed once per model and kept under $LCDFAST_HOME)."""
        if heads is not None:
            if heads.auto_layer(self.n_layers) is not None:
                return heads.auto_layer(self.n_layers)
            if len(heads.layers) == 1:
                return heads.layers[0]
            raise LcdError(f"--exit-heads {heads.path}: no automatic layer among its layers "
                           f"{','.join(map(str, heads.layers))} (only fit-lens files with held-out statistics "
                           "record one); give --amateur-layer")
        return shared_head_auto_layer(self)

    def decode_config(
        self, method: str = "greedy", do_sample: bool | None = None, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, repetition_penalty: float = 1.0, amateur_layer: int | str | None = None,
        dola_layers: str | list[int] | None = None, dola_batch_mode: bool = False, alpha: float = 0.1,
        min_tokens_to_keep: int = 1, beta: float | None = None, amateur_temperature: float = 1.0,
        exit_norm: bool | None = None, contrast_special: bool = False, exit_heads: str | Path | None = None,
    ) -> DecodeConfig:
        """Validate options (LcdError naming the argument) and fix the decode step's static shape.

        `exit_heads`: a file of lenses or trained heads for this config's exit layers (None: the engine's, from
        set_exit_heads, if any; "": the shared head)."""
        n = self.n_layers
        if exit_heads is None:
            heads = self.exit_heads
        elif not isinstance(exit_heads, str | Path):
            raise LcdError(f"exit_heads: {exit_heads!r} must be a file path")
        else:
            heads = self.read_exit_heads(exit_heads) if str(exit_heads) else None
        path = "" if heads is None else str(Path(heads.path).resolve())
        temperature, top_p, repetition_penalty = real("temperature", temperature), real("top_p", top_p), \
            real("repetition_penalty", repetition_penalty)
        alpha, amateur_temperature = real("alpha", alpha), real("amateur_temperature", amateur_temperature)
        beta = None if beta is None else real("beta", beta)
        top_k, min_tokens_to_keep = whole("top_k", top_k, 0), whole("min_tokens_to_keep", min_tokens_to_keep, 1)
        if amateur_layer == "auto":
            amateur_layer = self.auto_layer(heads)
        elif amateur_layer is not None:
            if isinstance(amateur_layer, str):
                raise LcdError(f"amateur_layer: {amateur_layer!r} must be a layer index or 'auto'")
            whole("amateur_layer", amateur_layer, 0)
        if method not in METHODS:
            raise LcdError(f"method: '{method}' unknown (expected one of {', '.join(METHODS)})")
        if not 0 <= temperature < math.inf:
            raise LcdError(f"temperature: {temperature} must be finite and >= 0")
        if not 0 < top_p <= 1:
            raise LcdError(f"top_p: {top_p} must be in (0, 1]")
        if top_k < 0:
            raise LcdError(f"top_k: {top_k} must be >= 0")
        if not 0 < repetition_penalty < math.inf:
            raise LcdError(f"repetition_penalty: {repetition_penalty} must be finite and > 0")
        if not 0 < alpha <= 1:
            raise LcdError(f"alpha: {alpha} must be in (0, 1]")
        if min_tokens_to_keep < 1:
            raise LcdError(f"min_tokens_to_keep: {min_tokens_to_keep} must be >= 1")
        if not 0 < amateur_temperature < math.inf:
            raise LcdError(f"amateur_temperature: {amateur_temperature} must be finite and > 0")
        if beta is not None and not 0 <= beta < math.inf:
            raise LcdError(f"beta: {beta} must be finite and >= 0")
        do_sample = method == "sample" if do_sample is None else do_sample
        if temperature == 0:
            do_sample, temperature = False, 1.0
        # layer options are checked whichever method reads them
        layer = n // 2 if amateur_layer is None else amateur_layer
        if not 0 <= layer < n:
            raise LcdError(f"amateur_layer: {layer} outside 0..{n - 1}")
        candidates = dola_candidates("high" if dola_layers is None else dola_layers, n,
                                     self.model.config.tie_embeddings)
        exit_layers: tuple[int, ...] = ()
        if method == "acd":
            exit_layers = (layer,)
        elif method == "dola":
            exit_layers = candidates
        elif method == "cd" and self.amateur is None:
            raise LcdError("method cd: needs an amateur model (--amateur-model DIR)")
        self._readout(exit_layers, path)  # the exit heads' file has every layer read
        if exit_norm is None:  # DoLa's reference reads its layers unnormed; lenses and heads were made through it
            exit_norm = method != "dola" or heads is not None
        special = () if contrast_special or method not in ("acd", "cd") else self.special_ids
        return DecodeConfig(method, do_sample, float(temperature), int(top_k), float(top_p),
                            float(repetition_penalty), float(alpha), int(min_tokens_to_keep), exit_layers,
                            exit_norm, dola_batch_mode, beta, float(amateur_temperature), special_ids=special,
                            exit_heads=path)

    @functools.cached_property
    def special_ids(self) -> tuple[int, ...]:
        """The tokens ACD and CD leave out of the contrast by default: special/control tokens and EOS ids."""
        V = self.model.config.vocab_size
        return tuple(i for i in sorted(set(self.tokenizer.special_token_ids()) | set(self.eos_ids)) if 0 <= i < V)

    def encode_prompt(self, prompt: str | list[dict[str, str]], chat: bool = False) -> list[int]:
        """Token ids of a prompt; `chat`: of the chat template's rendering (a string or a list of messages)."""
        if chat:
            return self.check_ids(self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt),
                                                        add_special_tokens=False))
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise LcdError("prompt: empty after tokenization")
        return self.check_ids(ids)

    def check_ids(self, ids: list[int]) -> list[int]:
        """`ids` if every one is in the model's vocabulary, else an LcdError naming the first that is not."""
        V = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise LcdError(f"token id {bad} outside the model's vocabulary 0..{V - 1} (a tokenizer for another model?)")
        return ids

    def generate(
        self, prompts: str | list[str] | list[list[int]], max_new_tokens: int = 64, seed: int = 0,
        stop: list[str] | None = None, chat: bool = False, batch_size: int = 8,
        stream: Callable[[int, str], None] | None = None, **options,
    ) -> list[Generation]:
        """Generate for each prompt (a string, or its token ids as they are); `options` are decode_config's
        (method, temperature, top_p, ...).

        `stream(row, text)` receives each row's new text as it is decoded (rows of the current batch)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) or is_ids(p)
                                                                           for p in prompts):
            raise LcdError("prompts: expected a string or a non-empty list of strings (or of token-id lists)")
        if "" in stop:
            raise LcdError("stop: an empty stop string would stop at once")
        if whole("seed", seed, 0) >= 2**63:
            raise LcdError(f"seed: {seed} outside 0..2**63-1")
        whole("max_new_tokens", max_new_tokens, 1)
        whole("batch_size", batch_size, 1)
        dc = self.decode_config(**options)
        encoded = [self.encode_prompt(p, chat) if isinstance(p, str) else self.check_ids(list(p)) for p in prompts]
        prompts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        for p, ids in zip(prompts, encoded):
            if len(ids) + max_new_tokens > self.max_seq_len:
                raise LcdError(f"prompt: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the cache of "
                               f"{self.max_seq_len} tokens ({p[:40]!r}...)")
        results = []
        for start in range(0, len(prompts), batch_size):
            chunk = encoded[start:start + batch_size]
            results += self._generate_batch(prompts[start:start + batch_size], chunk, dc, max_new_tokens, seed,
                                            stop, stream, start)
        return results

    def _generate_batch(self, prompts, encoded, dc, max_new_tokens, seed, stop, stream, offset) -> list[Generation]:
        decoders = [StreamDecoder(self.tokenizer) for _ in encoded]
        texts = [""] * len(encoded)
        sent = [0] * len(encoded)  # characters of texts[i] streamed: never a stop string or what may begin one

        def on_tokens(ids: list[int], live: list[bool]) -> list[bool]:
            stops = []
            for i, tok in enumerate(ids):
                if live[i] and tok not in self.eos_ids:
                    texts[i] += decoders[i].push(tok)
                    n = releasable(texts[i][sent[i]:], stop)[0]
                    if stream is not None and n:
                        stream(offset + i, texts[i][sent[i]:sent[i] + n])
                        sent[i] += n
                stops.append(any(s in texts[i] for s in stop))
            return stops

        t0 = time.perf_counter()
        amateur = self.amateur if dc.method == "cd" else None
        slots = generation_slots(self.model, amateur, max(len(ids) for ids in encoded), max_new_tokens)
        step, key, first = self._plan_step(dc, len(encoded), slots, max_new_tokens - 1)
        loads = isinstance(step, SavedStep) and step.fn is None and step.path.exists()
        # streamed: a step that only loads (seconds) is loaded after the first token is out, with no status line
        # (it would cut into the streamed text); a first compile (tens of seconds) shows one, before the prefill
        late = first and loads and stream is not None
        warmup = self.compile_status(f"{dc.method}, batch {len(encoded)}", loads) if first and not late else None
        # (the counters import Dynamo: a step loaded late takes them after its first token, as it is loaded)
        before = fx_cache_counts() if first and (not late or "torch._dynamo" in sys.modules) else (0, 0)
        with torch.inference_mode():
            out, reasons, layers, stats = generate_ids(
                self.model, encoded, dc, max_new_tokens, self.eos_ids, seed, amateur,
                self._readout(dc.exit_layers, dc.exit_heads), step,
                on_tokens if stream is not None or stop else None, warmup, late)  # no per-token decoding unless needed
        seconds = time.perf_counter() - t0
        saved = isinstance(step, SavedStep) and not step.failed
        stats["compiled"] = step is not decode_step and (saved or not self.compile_failed)  # (or fell back)
        after = fx_cache_counts() if first else (0, 0)
        stats["compile_cache_hit"] = (after[0] > before[0] or saved and step.loaded) if first else None
        stats["compile_uncached"] = after[1] > before[1]
        stats["compile_loaded"] = saved and step.loaded if first else None
        self._record(key, stats, first)
        results = []
        for i, ids in enumerate(out):
            content = [t for t in ids if t not in self.eos_ids]
            text = self.tokenizer.decode(content)
            if reasons[i] == "stop":
                cut = min(text.find(s) for s in stop if s in text)
                text = text[:cut]
            if stream is not None and text[sent[i]:]:
                stream(offset + i, text[sent[i]:])  # what was held back, up to any stop string
            results.append(Generation(prompts[i], text, ids, len(encoded[i]), reasons[i], seconds,
                                      layers[i] if dc.method == "dola" else None, stats))
        return results

    def _record(self, key: str, stats: dict, compiled_first: bool) -> None:
        """Keep this run's step (and compile) times for later runs' choice; runs too short to time say nothing."""
        values = {}
        if stats["decode_steps"] >= 8:
            values["compiled_ms" if stats["compiled"] else "eager_ms"] = \
                1000 * stats["decode_seconds"] / stats["decode_steps"]
        if compiled_first and stats["compiled"]:
            kind = "load_s" if stats["compile_loaded"] else "warm_s" if stats["compile_cache_hit"] else "cold_s"
            values[kind] = stats["compile_seconds"]
            values["uncached"] = stats["compile_uncached"]
        if values:
            self.timings.update(key, **values)

    def score_config(
        self, method: str = "greedy", amateur_layer: int | str | None = None,
        dola_layers: str | list[int] | None = None, alpha: float = 0.1, relative_top: float = 0.1,
        relative_top_value: float = -1000.0, post_softmax: bool = True, exit_norm: bool | None = None,
        beta: float | None = None, amateur_temperature: float = 1.0, contrast_special: bool = False,
        exit_heads: str | Path | None = None,
    ) -> ScoreConfig:
        """Validate one scoring recipe (LcdError naming the argument); see generate.method_log_scores."""
        if method == "sample":
            method = "greedy"
        if not 0 <= relative_top <= 1:
            raise LcdError(f"relative_top: {relative_top} must be in [0, 1]")
        if not math.isfinite(relative_top_value):
            raise LcdError(f"relative_top_value: {relative_top_value} must be finite")
        dc = self.decode_config(method, amateur_layer=amateur_layer, dola_layers=dola_layers, alpha=alpha,
                                exit_norm=exit_norm, beta=beta, amateur_temperature=amateur_temperature,
                                contrast_special=contrast_special, exit_heads=exit_heads)
        return ScoreConfig(method, dc.exit_layers, dc.exit_norm, dc.alpha, float(relative_top),
                           float(relative_top_value), post_softmax, beta, dc.amateur_temperature,
                           dc.special_ids if method == "acd" else (), dc.exit_heads)

    def score(self, prompts: list[str], continuations: list[str], batch_size: int = 8, **options) -> list[float]:
        """Log-likelihood of each continuation after its prompt under one method (options: score_config's)."""
        return self.score_methods(prompts, continuations, [options], batch_size)[0]

    def score_methods(
        self, prompts: list[str], continuations: list[str], methods: list[dict], batch_size: int = 8,
    ) -> list[list[float]]:
        """Several methods' log-likelihoods from one forward pass per batch: [method][item].

        Tokenized as DoLa's scripts do: the continuation's ids are those of prompt + continuation after the
        prompt's own ids. The prompts' shared token prefix (a few-shot demo) is computed once per batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        continuations = [continuations] if isinstance(continuations, str) else list(continuations)
        if len(prompts) != len(continuations):
            raise LcdError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
        whole("batch_size", batch_size, 1)  # before any tokenizing
        p_ids, c_ids = [], []
        for p, c in zip(prompts, continuations):
            ids = self.encode_prompt(p)
            full = self.check_ids(self.tokenizer.encode(p + c))
            if len(full) <= len(ids):
                raise LcdError(f"score: continuation {c!r} adds no token after its prompt")
            p_ids.append(ids)
            c_ids.append(full[len(ids):])
        return self.score_tokens(p_ids, c_ids, methods, batch_size)

    def score_limit(self, methods: list[ScoreConfig]) -> int:
        """The most tokens (prompt + continuation) one row may hold under `methods`."""
        limit, amateur = self.max_seq_len, self.amateur
        if amateur is not None and amateur.config.positions == "learned" and any(c.method == "cd" for c in methods):
            limit = min(limit, amateur.config.max_positions)
        return limit

    def score_tokens(
        self, prompts: list[list[int]], continuations: list[list[int]], methods: list[dict], batch_size: int = 8,
        greedy: bool = False,
    ) -> list[list[float]] | list[list[tuple[float, bool]]]:
        """score_methods on token ids: [method][item] sums of the continuation's log-scores (`greedy`: with whether
        each continuation is its method's own top-1 choice at every position, lm-eval's `is_greedy`)."""
        whole("batch_size", batch_size, 1)
        if len(prompts) != len(continuations):
            raise LcdError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
        configs = [self.score_config(**m) for m in methods]
        limit = self.score_limit(configs)
        for p, c in zip(prompts, continuations):
            if not p or not c:
                raise LcdError(f"score: {'a prompt' if not p else 'a continuation'} of no tokens")
            self.check_ids(p + c)
            if len(p) + len(c) > limit:
                raise LcdError(f"score: prompt + continuation of {len(p) + len(c)} tokens exceed {limit}")
        results = [[] for _ in configs]
        for start in range(0, len(prompts), batch_size):
            scored = score_ids(self.model, prompts[start:start + batch_size], continuations[start:start + batch_size],
                               configs, self._score_readout, self.amateur, self.prefix_cache, greedy)
            for out, totals in zip(results, scored):
                out += totals
        return results

    @torch.inference_mode()
    def layer_logits(self, input_ids: Tensor | list[int], layers: list[int] | None = None,
                     exit_norm: bool = True) -> Tensor:
        """Early-exit logits [L, B, T, V] (float32) at `layers` (default 0..N); layer N is the model's output.
        Layers the engine's exit heads (set_exit_heads) cover are read through them, the others through the shared
        head."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.model.device)
        ids = ids[None] if ids.dim() == 1 else ids
        n = self.n_layers
        layers = list(range(n + 1)) if layers is None else list(layers)
        if not layers:
            raise LcdError("layers: empty")
        for j in layers:
            if not 0 <= j <= n:
                raise LcdError(f"layers: {j} outside 0..{n}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise LcdError(f"input_ids: expected [T] or [B, T] token ids, got shape {tuple(ids.shape)}")
        self.check_ids(ids.flatten().tolist())
        B, T = ids.shape
        if T > self.max_seq_len:
            raise LcdError(f"input_ids: {T} tokens exceed the cache of {self.max_seq_len}")
        self.model.setup_caches(B, T)
        early = sorted(set(layers) - {n})  # the model yields its exits in layer order, once each
        heads = self.exit_heads

        def readout(j: int) -> Readout | None:  # through the engine's exit heads where they have the layer
            return self._readout((j,), str(heads.path)) if heads is not None and j in heads.layers else None

        final, exits = self.model(ids, torch.arange(T, device=ids.device),
                                  torch.zeros(B, dtype=torch.long, device=ids.device), tuple(early))
        out = []
        for j in layers:
            if j == n:
                out.append(self.model.logits(final).float())
            else:
                out.append(exit_logits(self.model, exits[early.index(j)][None], exit_norm, readout(j))[0])
        out = torch.stack(out)
        if not finite(out):
            raise LcdError(f"layer_logits: the model's logits are NaN or infinite (weights that overflow "
                           f"{self.model.dtype}?)")
        return out

    def lens(self, prompt: str, last: int = 6, layers: list[int] | None = None,
             exit_norm: bool = True) -> dict:
        """Top token and its probability at every layer (default: every layer, or those of the engine's exit heads
        and the last) for the last `last` positions of the prompt."""
        whole("last", last, 1)
        ids = self.encode_prompt(prompt)
        last = min(last, len(ids))
        if layers is None:
            heads = self.exit_heads
            layers = sorted({*heads.layers, self.n_layers}) if heads is not None else list(range(self.n_layers + 1))
        layers = list(layers)
        probs = self.layer_logits(ids, layers, exit_norm)[:, 0, -last:].softmax(-1)  # [L, P, V]
        top_p, top_id = probs.max(-1)
        tok = self.tokenizer
        return {"layers": layers,
                "positions": [tok.decode([t], skip_special_tokens=False) for t in ids[-last:]],
                "next_of_position": [tok.decode([t], skip_special_tokens=False) for t in ids[len(ids) - last + 1:]]
                + [None],
                "top_tokens": [[tok.decode([t], skip_special_tokens=False) for t in row] for row in top_id.tolist()],
                "top_probs": top_p.tolist()}


def load(path: str | Path | None = None, dtype: str = "float32", device: str = "cpu", compile: bool | None = None,
         max_seq_len: int = 4096, quantize: str | None = None, tp: int = 1) -> Engine:
    """Load a checkpoint directory (default: the bundled SmolLM2-135M-Instruct, converted once).

    `compile`: None compiles the decode step for the runs where that pays off (see compiling.py), True for every
    run, False never. `quantize`: weight-only quantization of every linear and the head as they are read ('int8':
    one scale per output row; 'int8:G', 'int4' = 'int4:32', 'int4:G': per group of G inputs; quant.py); 'gguf':
    the blocks of a checkpoint converted from GGUF, as they are; '': float; None: as stored (a quantized
    checkpoint's codes, else float); any of these modes + '+a8' (e.g. 'gguf+a8'): activations quantized to int8 at
    each product with a quantized weight too (quant.quantize_activations). `tp`: split the model over that many
    ranks (tensor parallel; the process is one of them, started by torchrun with as many processes): each loads
    the checkpoint on the CPU, keeps its part (parallel.shard_model) and moves it to `device` (its own GPU under
    CUDA)."""
    if path is None:
        from .convert import default_model_dir
        path = default_model_dir()
    path, device = Path(path), str(device)  # a torch.device too
    whole("max_seq_len", max_seq_len, 1)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LcdError(f"device: '{device}' requested but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LcdError(f"device: '{device}' unsupported (expected cpu or cuda)")
    whole("tp", tp, 1)
    _, ranks = init(device)
    device = device_of(device)
    if tp > 1 and ranks != tp:
        raise LcdError(f"--tp {tp}: this process is one of {ranks} (launch with torchrun --nproc-per-node {tp})")
    model = load_model(path, dtype, "cpu" if tp > 1 else device, quantize)
    if tp > 1:
        model = shard_model(model).to(device)
    engine = Engine(model, Tokenizer.load(path), path, max_seq_len)
    if compile is not None and not isinstance(compile, bool):
        raise LcdError(f"compile: {compile!r} must be True, False or None")
    if compile:
        engine.enable_compile()
    elif compile is False:
        engine.compile_mode = "off"
    return engine
