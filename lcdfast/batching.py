"""Continuous batching for `lcdfast serve`: one decode loop on its own thread; requests join it at the next step and
leave it the step they finish or are cancelled.

Requests are grouped by their DecodeConfig (the method and every option the step's graph depends on). A group is a
batch of up to `max_batch` cache rows stepped together; each turn of the loop admits what waits, then steps every
group once, oldest group first, so requests with different methods or options never wait for each other's batch
to drain. A request joins a group with a free row: its prompt is prefilled (eagerly) into the row and its first
token comes from that prefill; the group's next step already carries it.

The rows of a group share one write slot t (every row's next token goes to slot t) and a row's tokens lie at slots
[start, t): the left padding of generate_ids with `start` as the row's pad, so positions (slot - start), masks and
sliding windows are exactly those of the request run alone. A prompt longer than t shifts the group's cached slots
right; a request that would run past the cache's end shifts them left (positions are unchanged either way); a
request that fits neither way waits. A step runs over the first b rows, b the power of two past the last row in
use, so a lone request decodes at batch 1: one compiled graph per b and config, made once that (config, b) has run
COMPILE_AFTER eager steps (the compile pauses the loop once, seconds; a config that runs fewer never compiles).
"""

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compiling import RECOMPILE_LIMIT
from .generate import DecodeConfig, Readout, decode_step
from .tokenizer import StreamDecoder, releasable

COMPILE_AFTER = 32  # eager steps of a (config, batch size) before its compiled graph is made and used
MAX_GRAPHS = RECOMPILE_LIMIT - 8  # compiled (config, batch size) graphs at most; any more decode eagerly


class QueueFull(Exception):
    """The server's queue of requests waiting for a row is full, or it is draining."""


@dataclass(eq=False)
class Request:
    """One completion. `emit(event)` is called on the loop's thread with dicts: {"text", "logprobs"} as text is
    final, then one {"done": True, ...} (finish_reason "eos" | "stop" | "length", the whole text and token ids) or
    {"error": message}. `cancelled` is set by the client's side; the loop frees the row at its next turn."""

    ids: list[int]
    dc: DecodeConfig
    max_new_tokens: int
    emit: Callable[[dict], None]
    seed: int | None = None  # sampling: None draws one
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False


@dataclass(eq=False)
class Row:
    request: Request
    start: int  # the cache slot of the prompt's first token
    decoder: StreamDecoder
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # DoLa: the layer contrasted at each token
    unsent: list[dict] = field(default_factory=list)  # logprobs of tokens not yet in an event
    text: str = ""
    sent: int = 0  # characters of `text` emitted

    @property
    def length(self) -> int:  # slots the row may occupy: its prompt and every new token
        return len(self.request.ids) + self.request.max_new_tokens


def bucket(rows: int, most: int) -> int:
    """The batch a step runs at for `rows` leading rows: the next power of two, at most `most`."""
    return min(most, 1 << max(rows - 1, 0).bit_length())


def attach(model, caches: list[Tensor], rows: slice) -> None:
    """Point every layer's KV cache at rows of a group's caches ([2, B, K, S, D] per layer): a view, no copy."""
    for layer, kv in zip(model.layers, caches):
        layer.attention.kv_cache.kv = kv[:, rows]


class Group:
    """Rows decoding with one DecodeConfig: their caches, write slot, pads, last tokens and seen-token masks."""

    def __init__(self, batcher: "Batcher", dc: DecodeConfig, caches: dict[str, list[Tensor]]) -> None:
        self.batcher, self.dc, self.caches = batcher, dc, caches
        B, S, V = batcher.max_batch, batcher.max_seq_len, batcher.engine.model.config.vocab_size
        device = batcher.engine.model.device
        self.rows: list[Row | None] = [None] * B
        self.t = 0  # the slot every row's next token is written to
        self.pad = torch.full((B,), S, dtype=torch.long, device=device)  # a free row's pad hides the whole cache
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        self.readout: Readout | None = batcher.engine._readout(dc.exit_layers, dc.exit_heads)

    @property
    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def shift_for(self, request: Request) -> int | None:
        """How far to move the cached slots so that `request` fits (0 if it fits as they are), None if it can't."""
        live, S, n = self.live, self.batcher.max_seq_len, len(request.ids)
        if not live:
            return n - self.t  # an empty group starts the row at slot 0
        starts = [self.rows[i].start for i in live]
        low = max(n - self.t, -min(starts))  # room for the prompt before t; no row moved below slot 0
        high = min([S - request.max_new_tokens - self.t] + [S - self.rows[i].length - self.rows[i].start
                                                              for i in live])
        return None if low > high else min(max(0, low), high)

    def shift(self, delta: int) -> None:
        """Move every row's cached slots [min start, t) by delta, and their starts and t with them."""
        live = self.live
        if delta and live:
            first, rows = min(self.rows[i].start for i in live), live[-1] + 1
            for caches in self.caches.values():
                for kv in caches:  # [2, B, K, S, D]
                    kv[:, :rows, :, first + delta:self.t + delta] = kv[:, :rows, :, first:self.t].clone()
            for i in live:
                self.rows[i].start += delta
                self.pad[i] += delta
        self.t += delta

    def admit(self, request: Request) -> bool:
        """Prefill `request` into a free row and emit its first token; False if no row or no room (it waits)."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        delta = self.shift_for(request) if free else None
        if delta is None:
            return False
        self.shift(delta)
        engine, dc, i, n = self.batcher.engine, self.dc, free[0], len(request.ids)
        generator = None
        if dc.do_sample:
            seed = random.randrange(2**63) if request.seed is None else request.seed
            generator = torch.Generator().manual_seed(seed)
        row = Row(request, self.t - n, StreamDecoder(engine.tokenizer), generator)
        self.rows[i] = row
        self.pad[i] = row.start
        self.seen[i] = False
        self.seen[i, request.ids] = True
        device = engine.model.device
        self._attach(slice(i, i + 1))
        tokens = torch.tensor([request.ids], device=device)
        slots = torch.arange(row.start, self.t, device=device)
        span = torch.arange(self.t, device=device)
        noise = self._noise([row])
        picked, chosen, logprobs = decode_step(engine.model, self._amateur, self.readout, tokens, slots, span,
                                               self.pad[i:i + 1], self.seen[i:i + 1], noise, dc)
        self._take(picked, chosen, logprobs, [i], first=i)
        return True

    def step(self) -> None:
        """One token for every live row, through the batcher's step for this config and batch size."""
        live = self.live
        if not live:
            return
        b = bucket(live[-1] + 1, len(self.rows))
        step_fn = self.batcher.step_for(self.dc, b)
        self._attach(slice(0, b))
        device = self.batcher.engine.model.device
        span = torch.arange(self.t + 1, device=device)
        if step_fn is not decode_step:
            torch._dynamo.maybe_mark_dynamic(span, 0)  # one graph for every attended length
        noise = self._noise(self.rows[:b])
        picked, chosen, logprobs = step_fn(
            self.batcher.engine.model, self._amateur, self.readout, self.token[:b, None].clone(),
            torch.tensor([self.t], device=device), span, self.pad[:b], self.seen[:b], noise, self.dc)
        self.t += 1
        self._take(picked, chosen, logprobs, live, first=0)

    @property
    def _amateur(self):
        return self.batcher.engine.amateur if self.dc.method == "cd" else None

    def _attach(self, rows: slice) -> None:
        attach(self.batcher.engine.model, self.caches["model"], rows)
        if "amateur" in self.caches:
            attach(self.batcher.engine.amateur, self.caches["amateur"], rows)

    def _noise(self, rows: list[Row | None]) -> Tensor | None:
        """Sampling: each row's uniform noise [b, V] from its own generator (free rows: a constant)."""
        if not self.dc.do_sample:
            return None
        V = self.batcher.engine.model.config.vocab_size
        return torch.stack([torch.rand(V, generator=r.generator) if r is not None else torch.full((V,), 0.5)
                            for r in rows]).to(self.batcher.engine.model.device)

    def _take(self, picked: Tensor, chosen: Tensor, logprobs, rows: list[int], first: int) -> None:
        """Record a step's tokens for `rows` (the step's batch starts at row `first`), emit their text, and free
        the rows that finished."""
        ids, picks = picked.tolist(), chosen.tolist()  # the one host sync per step
        lp = None if logprobs is None else [t.tolist() for t in logprobs]
        engine, eos = self.batcher.engine, self.batcher.engine.eos_ids
        for i in rows:
            j, row = i - first, self.rows[i]
            token = ids[j]
            if token < 0:
                self._free(i)
                row.request.emit({"error": f"the model's scores are NaN or infinite at new token {len(row.out)} "
                                           f"(weights that overflow {engine.model.dtype}?)"})
                continue
            self.token[i] = token
            self.seen[i, token] = True
            row.out.append(token)
            if self.dc.method == "dola":
                row.layers.append(self.dc.exit_layers[picks[j]])
            if token in eos:
                self._finish(i, "eos")
                continue
            if lp is not None:
                row.unsent.append({"id": token, "logprob": lp[0][j],
                                   "top": list(zip(lp[2][j], lp[1][j]))})
            stop = row.request.stop
            row.text += row.decoder.push(token)
            n, stopped = releasable(row.text[row.sent:], stop)
            if stopped:
                self._finish(i, "stop")
            elif len(row.out) == row.request.max_new_tokens:
                self._finish(i, "length")
            elif n:
                row.request.emit({"text": row.text[row.sent:row.sent + n], "logprobs": row.unsent})
                row.sent, row.unsent = row.sent + n, []

    def _finish(self, i: int, reason: str) -> None:
        """The row's last event, as Engine.generate makes its text: the ids but EOS decoded, cut at a stop string."""
        row, engine = self.rows[i], self.batcher.engine
        self._free(i)
        text = engine.tokenizer.decode([t for t in row.out if t not in engine.eos_ids])
        if reason == "stop":
            text = text[:min(text.find(s) for s in row.request.stop if s in text)]
        row.request.emit({"done": True, "finish_reason": reason, "text": text, "delta": text[row.sent:],
                          "logprobs": row.unsent, "token_ids": row.out, "prompt_tokens": len(row.request.ids),
                          "dola_layers": row.layers if self.dc.method == "dola" else None})

    def _free(self, i: int) -> None:
        self.rows[i] = None
        self.pad[i] = self.batcher.max_seq_len
        if not self.live:
            self.t = 0

    def cancel_rows(self) -> None:
        for i in self.live:
            if self.rows[i].request.cancelled:
                self._free(i)

    def fail(self, message: str) -> None:
        for i in self.live:
            request = self.rows[i].request
            self._free(i)
            request.emit({"error": message})


class Batcher:
    """The decode loop's thread, its queue and its groups. `submit` is safe from any thread."""

    def __init__(self, engine, max_batch: int = 16, max_seq_len: int = 2048, max_queue: int = 64,
                 max_groups: int = 4, compiled: bool = True, compile_after: int = COMPILE_AFTER) -> None:
        self.engine, self.max_batch, self.max_queue, self.max_groups = engine, max_batch, max_queue, max_groups
        self.max_seq_len = min(max_seq_len, engine.max_seq_len)
        self.compiled, self.compile_after = compiled, compile_after
        self.eager_steps: collections.Counter[tuple[DecodeConfig, int]] = collections.Counter()
        self.compiled_keys: set[tuple[DecodeConfig, int]] = set()
        if compiled:
            engine._compiled()
        self.pending: collections.deque[Request] = collections.deque()
        self.groups: list[Group] = []
        self.spare: dict[str, list[list[Tensor]]] = {"model": [], "amateur": []}  # caches of groups gone
        self.wake = threading.Condition()
        self.model_lock = threading.Lock()  # the model runs on one thread at a time: the loop, or decode_config
        self.draining = False
        self.stopped = False
        self.steps = 0  # decode steps taken (all groups)
        self.served = 0  # requests admitted
        self.thread = threading.Thread(target=self._run, name="lcdfast-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def decode_config(self, **options) -> DecodeConfig:
        """Engine.decode_config, on the caller's thread but never while a step runs ('auto' may run the model)."""
        with self.model_lock:
            return self.engine.decode_config(**options)

    def submit(self, request: Request) -> None:
        """Queue `request` for the next turn; QueueFull if max_queue requests already wait or the server drains."""
        if len(request.ids) + request.max_new_tokens > self.max_seq_len:
            raise ValueError(f"{len(request.ids)} prompt tokens + {request.max_new_tokens} new exceed the "
                             f"{self.max_seq_len} cache slots of a row")
        with self.wake:
            if self.draining:
                raise QueueFull("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting for a row (--max-queue {self.max_queue})")
            self.pending.append(request)
            self.wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let every running and queued one finish, then end the loop."""
        with self.wake:
            self.draining = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def busy(self) -> int:
        """Requests queued or decoding."""
        return len(self.pending) + sum(len(g.live) for g in self.groups)

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.pending and not self.groups and not self.draining:
                    self.wake.wait()
                if self.draining and not self.pending and not self.groups:
                    self.stopped = True
                    return
                waiting = list(self.pending)
            with self.model_lock:
                self._turn(waiting)

    def _turn(self, waiting: list[Request]) -> None:
        engine = self.engine
        with torch.inference_mode():
            self._ensure_caches(engine.model)
            if engine.amateur is not None:
                self._ensure_caches(engine.amateur)
            blocked: set[DecodeConfig] = set()  # configs whose oldest waiting request found no room: FIFO within one
            for request in waiting:
                if request.cancelled or request.dc not in blocked and self._place(request):
                    with self.wake:
                        self.pending.remove(request)
                else:
                    blocked.add(request.dc)
            for group in list(self.groups):
                group.cancel_rows()
                try:
                    group.step()
                    self.steps += 1
                except Exception as e:  # noqa: BLE001 - one group's failure ends its requests, not the server
                    group.fail(f"decoding failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                if not group.live:
                    self.groups.remove(group)
                    for name, caches in group.caches.items():
                        self.spare[name].append(caches)

    def step_for(self, dc: DecodeConfig, batch: int) -> Callable:
        """The compiled step once `dc` has run compile_after eager steps at this batch size (a config that runs fewer
        never stalls the loop with a compile), else decode_step."""
        if not self.compiled:
            return decode_step
        key = (dc, batch)
        if key in self.compiled_keys:
            return self.engine._step
        if self.eager_steps[key] >= self.compile_after and len(self.compiled_keys) < MAX_GRAPHS:
            self.compiled_keys.add(key)
            return self.engine._step
        self.eager_steps[key] += 1
        return decode_step

    def _place(self, request: Request) -> bool:
        """Admit `request` into a group of its config with room, else a new group while there are fewer than
        max_groups; False if it must wait."""
        for group in self.groups:
            if group.dc == request.dc and self._admit(group, request):
                return True
        if len(self.groups) >= self.max_groups:
            return False
        caches = {"model": self._caches("model", self.engine.model)}
        if request.dc.method == "cd":
            caches["amateur"] = self._caches("amateur", self.engine.amateur)
        group = Group(self, request.dc, caches)
        self.groups.append(group)
        return self._admit(group, request)

    def _admit(self, group: Group, request: Request) -> bool:
        try:
            admitted = group.admit(request)
            self.served += admitted
            return admitted
        except Exception as e:  # noqa: BLE001 - a failing prefill ends that request only
            for i, row in enumerate(group.rows):
                if row is not None and row.request is request:
                    group._free(i)
            request.emit({"error": f"prefill failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"})
            return True

    def _caches(self, name: str, model) -> list[Tensor]:
        """A group's KV caches for `model`, [2, B, K, S, D] per layer: a gone group's, else new ones."""
        if self.spare[name]:
            return self.spare[name].pop()
        cfg = model.config
        shape = (2, self.max_batch, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
        return [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in model.layers]

    def _ensure_caches(self, model) -> None:
        """The model's rotary tables (and KVCache modules, whose tensors attach() replaces) cover max_seq_len."""
        if model.max_seq_len != self.max_seq_len or model.layers[0].attention.kv_cache is None:
            model.setup_caches(1, self.max_seq_len)
            model.max_batch = -1  # the caches are ours now: another caller's setup_caches makes its own


def wait_idle(batcher: Batcher, timeout: float = 10.0) -> bool:
    """Wait until nothing is queued or decoding (tests, benchmarks); False on timeout."""
    deadline = time.monotonic() + timeout
    while batcher.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    return not batcher.busy
