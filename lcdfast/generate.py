"""Decoding: prefill, the per-token step (the unit that gets compiled), the generate loop, and scoring.

Shapes: B rows, T prompt tokens (left-padded), V vocab, E head width, C model width, L exit layers.
"""

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from . import contrast, parallel
from .errors import LcdError
from .model import Transformer, linear, softcapped

METHODS = ("greedy", "sample", "acd", "dola", "cd")
TOP_LOGPROBS = 20  # alternatives a logprobs step returns per token (OpenAI's top_logprobs allows up to 20)


@dataclass(frozen=True)
class DecodeConfig:
    """Everything that shapes the decode step's graph; torch.compile specializes on these values."""

    method: str = "greedy"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    alpha: float = 0.1  # plausibility (ACD, CD) / DoLa's relative_top
    min_tokens_to_keep: int = 1
    exit_layers: tuple[int, ...] = ()  # ACD: (amateur layer,); DoLa: the candidate layers
    exit_norm: bool = True
    dola_batch_mode: bool = False
    beta: float | None = None  # CD's beta form when set
    amateur_temperature: float = 1.0
    head_candidates: int = 64  # ACD: expert's top tokens the masked contrast op scores; 0 = full projection
    special_ids: tuple[int, ...] = ()  # ACD, CD: tokens kept out of the contrast (they keep the expert's probability)
    exit_heads: str = ""  # the file of lenses or trained heads the exit layers are read through; "": the shared head
    logprobs: bool = False  # the step also returns the chosen token's log-probability and the TOP_LOGPROBS best


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    seconds: float
    dola_layers: list[int] | None = None
    stats: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


class Readout(NamedTuple):
    """How the exit layers are read, per exit layer; None: through the model's own final norm and head."""

    heads: Tensor | None = None  # [L, V, E] trained exit heads, each in place of the shared head
    lens_weight: Tensor | None = None  # [L, C, C] fitted lenses: T(h) = weight h + bias, then norm and shared head
    lens_bias: Tensor | None = None  # [L, C]


def readout_hidden(model: Transformer, exits: Tensor, use_norm: bool, readout: Readout | None) -> Tensor:
    """What the exit heads read from stacked residual streams [L, ..., C]: lens, then norm -> [L, ..., E]."""
    if readout is not None and readout.lens_weight is not None:
        exits = torch.stack([linear(h, w, b) for h, w, b in zip(exits, readout.lens_weight, readout.lens_bias)])
    return model.exit_hidden(exits, use_norm)


def exit_logits(model: Transformer, exits: Tensor, use_norm: bool, readout: Readout | None) -> Tensor:
    """Early-exit logits for stacked residual streams [L, B, C] -> [L, B, V]: soft-capped like the final layer's
    when read through the final norm (`use_norm`), the bare head's when not (DoLa's un-normed readout)."""
    hidden = readout_hidden(model, exits, use_norm, readout)  # [L, B, E]
    if readout is None or readout.heads is None:
        return model.logits(hidden, capped=use_norm).float()
    cap = model.config.final_softcap if use_norm else 0.0
    return torch.stack([softcapped(linear(h, w), cap) for w, h in zip(readout.heads, hidden)]).float()


def special_mask(special_ids: tuple[int, ...], like: Tensor) -> Tensor | None:
    """[V] bool, True on the tokens kept out of the contrast; None when there are none."""
    if not special_ids:
        return None
    return torch.zeros(like.shape[-1], dtype=torch.bool, device=like.device).index_fill_(
        0, torch.tensor(special_ids, device=like.device), True)


def contrast_scores(
    model: Transformer, final: Tensor, exits: Tensor | None, amateur_logits: Tensor | None,
    readout: Readout | None, dc: DecodeConfig,
) -> tuple[Tensor, Tensor]:
    """Scores over the vocabulary [B, V] for the method, and DoLa's chosen candidate index [B] (else zeros)."""
    chosen = torch.zeros(final.shape[0], dtype=torch.long, device=final.device)
    shared_head = readout is None or readout.heads is None
    shard = model.vocab_shard if shared_head else None  # tensor parallel: this rank's rows of the head
    if dc.method == "dola" and shared_head:
        # expert and candidates through the head in one pass over its weights: [1 + L, B, E] -> [1 + L, B, V]
        logits = model.output(torch.cat([final[None], readout_hidden(model, exits, dc.exit_norm, readout)]))
        # capped below in the model's dtype (as model.logits does): the expert always, the exits when normed
        cap = model.config.final_softcap
        expert = softcapped(logits[0], cap).float()
        layers = softcapped(logits[1:], cap if dc.exit_norm else 0.0).float()
        if shard is not None:  # [.., Vr]: the divergences from sharded sums, then the expert and chosen layer whole
            if len(dc.exit_layers) > 1:
                chosen = contrast.most_distant(parallel.sharded_js_divergence(expert, layers, shard),
                                               dc.dola_batch_mode)
            premature = layers.gather(0, chosen[None, :, None].expand(1, *expert.shape))[0]  # [B, Vr]
            expert, premature = parallel.gather_vocab(torch.stack([expert, premature]), shard)  # [2, B, V]
            return contrast.dola_scores(expert, premature, dc.alpha, dc.min_tokens_to_keep), chosen
    else:
        expert = model.logits(final).float()  # [B, V]
    if dc.method in ("greedy", "sample"):
        return expert, chosen
    special = special_mask(dc.special_ids, expert)
    if dc.method == "cd":
        return contrast.cd_scores(expert, amateur_logits.float(), dc.alpha, dc.beta, dc.amateur_temperature,
                                  dc.min_tokens_to_keep, special), chosen
    if dc.method == "acd" and dc.head_candidates > 0:
        hidden = readout_hidden(model, exits, dc.exit_norm, readout)[0]  # [B, E]
        head = model.output.weight if shared_head else readout.heads[0]  # [V, E]
        return contrast.acd_log_probs_masked(expert, hidden, head, dc.alpha, dc.min_tokens_to_keep,
                                             dc.head_candidates, special,
                                             model.config.final_softcap if dc.exit_norm else 0.0, shard), chosen
    if dc.method == "acd" or not shared_head:
        layers = exit_logits(model, exits, dc.exit_norm, readout)  # [L, B, V]
    if dc.method == "acd":
        return contrast.acd_log_probs(expert, layers[0], dc.alpha, dc.min_tokens_to_keep, special), chosen
    if len(dc.exit_layers) > 1:
        chosen = contrast.dola_select_layer(expert, layers, dc.dola_batch_mode)
    premature = layers.gather(0, chosen[None, :, None].expand(1, *expert.shape))[0]  # [B, V]
    return contrast.dola_scores(expert, premature, dc.alpha, dc.min_tokens_to_keep), chosen


def pick_token(scores: Tensor, seen: Tensor, uniform: Tensor | None, dc: DecodeConfig) -> tuple[Tensor, Tensor | None]:
    """Penalties, warpers and the choice: argmax, or Gumbel-max sampling from given uniform noise [B, V]. Also the
    log-distribution the token is picked from [B, V] when dc.logprobs (else None)."""
    if dc.repetition_penalty != 1.0:
        scores = contrast.apply_repetition_penalty(scores, seen, dc.repetition_penalty)
    if not dc.do_sample:
        return scores.argmax(-1), scores.log_softmax(-1) if dc.logprobs else None
    logp = contrast.sampling_log_probs(scores, dc.temperature, dc.top_k, dc.top_p)
    return (logp - torch.log(-torch.log(uniform))).argmax(-1), logp


Logprobs = tuple[Tensor, Tensor, Tensor]  # the chosen token's log-probability [B]; the best ones [B, K], their ids


def decode_step(
    model: Transformer, amateur: Transformer | None, readout: Readout | None, token: Tensor, slot: Tensor,
    span: Tensor | None, pad: Tensor, seen: Tensor, uniform: Tensor | None, dc: DecodeConfig,
) -> tuple[Tensor, Tensor, Logprobs | None]:
    """One token for every row: forward through the caches, heads, contrast, penalties, choice.

    token [B, T], slots [T], span [P] (the cache slots attended, see Transformer.forward), pad [B], seen [B, V]
    -> next token [B] (-1 where the scores are NaN or have no finite best: weights that overflow), DoLa candidate
    index [B], and with dc.logprobs the log-probabilities of the distribution the token was picked from (the
    method's scores after penalties and warpers), else None. T = 1 when decoding; generate_ids also runs the
    prompt through it (eager) as the prefill."""
    final, exits = model(token, slot, pad, dc.exit_layers, span)
    amateur_logits = amateur.logits(amateur(token, slot, pad, (), span)[0][:, -1]) if amateur is not None else None
    scores, chosen = contrast_scores(model, final[:, -1], None if exits is None else exits[:, :, -1],
                                     amateur_logits, readout, dc)
    garbage = scores.isnan().any(-1) | ~scores.amax(-1).isfinite()  # [B]
    picked, logp = pick_token(scores, seen, uniform, dc)
    picked = torch.where(garbage, -1, picked)
    if logp is None:
        return picked, chosen, None
    best = logp.topk(min(TOP_LOGPROBS, logp.shape[-1]), dim=-1)
    return picked, chosen, (logp.gather(1, picked.clamp(min=0)[:, None])[:, 0], best.values, best.indices)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token rows -> [B, T] left-padded tensor and the pad count per row [B]."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def guards_checked(step: int) -> contextlib.AbstractContextManager:
    """Context for the compiled step's call at loop index `step`: full guards for the first two calls of a generation
    (the first may compile, the second sees the attended span P change), then only the guards that tell cached graphs
    apart (torch.compile's skip_guard_eval_unsafe). Within one generation nothing else they check can change: the
    same model, caches, DecodeConfig, shapes and dtypes. Its ~300 tensor checks cost ~0.6 ms a step on 2 cores."""
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if step >= 2 else contextlib.nullcontext()


def cache_length(needed: int, limit: int) -> int:
    """Round the cache up to a multiple of 256 so compiled shapes repeat across calls."""
    return min(limit, -(-needed // 256) * 256)


def generation_slots(model: Transformer, amateur: Transformer | None, T: int, max_new_tokens: int) -> int:
    """Cache slots S for T prompt tokens and max_new_tokens, within the models' learned positions (else an error)."""
    limit = 1 << 30  # the models' learned positions, not the current cache: it may grow
    for name, m in (("model", model), ("amateur model", amateur)):
        cfg = m.config if m is not None else None
        if cfg is not None and cfg.positions == "learned":
            limit = min(limit, cfg.max_positions)
            if T + max_new_tokens > cfg.max_positions:
                raise LcdError(f"max_new_tokens: {T} prompt tokens + {max_new_tokens} exceed the {name}'s "
                               f"{cfg.max_positions} positions")
    return cache_length(T + max_new_tokens, limit)


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: list[list[int]],
    dc: DecodeConfig,
    max_new_tokens: int,
    eos_ids: list[int],
    seed: int = 0,
    amateur: Transformer | None = None,
    readout: Readout | None = None,
    step_fn: Callable | None = None,
    on_tokens: Callable[[list[int], list[bool]], bool] | None = None,
    warmup: contextlib.AbstractContextManager | None = None,
    warm_after_first: bool = False,
) -> tuple[list[list[int]], list[str], list[list[int]], dict]:
    """Decode every prompt together. Returns new ids, finish reasons, DoLa layers per step, and timings.

    `step_fn` replaces `decode_step` (the compiled version); `on_tokens(tokens, live)` sees each step's
    tokens on the host and returns True to stop a row early (stop strings) — it is called once per step.
    With `warmup`, step_fn is first called once inside that context, before the prefill, so that a compiled
    step compiles before any token is out; its time is the stats' compile_seconds. `warm_after_first` instead
    times step_fn's first call, after the prefill's token is out (a step that only loads: the first token need
    not wait for it), as the compile_seconds."""
    device = model.device
    B, V = len(prompts), model.config.vocab_size
    tokens, pad = left_pad(prompts, model.config.pad_token_id or 0, device)
    T = tokens.shape[1]
    if dc.method != "cd":
        amateur = None  # an engine may hold one for CD; no other method runs it
    S = generation_slots(model, amateur, T, max_new_tokens)
    for m in (model, amateur):
        if m is not None:
            m.setup_caches(B, S)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    for i, row in enumerate(prompts):
        seen[i, row] = True
    generators = [torch.Generator().manual_seed(seed) for _ in range(B)] if dc.do_sample else []

    def noise() -> Tensor | None:
        if not generators:
            return None
        return torch.stack([torch.rand(V, generator=g) for g in generators]).to(device)

    step_fn = step_fn or decode_step
    out = [[] for _ in range(B)]
    layers = [[] for _ in range(B)]
    reasons = ["length"] * B
    live = [True] * B
    t0 = time.perf_counter()
    # Attention reads slots [0, P) with P = the step's slot + 1: on CPU the compiled step takes P as a dynamic size
    # (one graph for every P < S). CUDA graphs replay fixed shapes only: there P = S, the whole cache.
    all_slots = torch.arange(S, device=device)

    compiled = step_fn is not decode_step  # eager alone never imports torch._dynamo (a second of start-up)

    def span(end: int) -> Tensor:
        if device.type == "cuda":
            return all_slots
        written = all_slots[:end]
        if compiled:
            torch._dynamo.maybe_mark_dynamic(written, 0)
        return written

    t_compile = 0.0
    if warmup is not None:  # writes K/V into slot T, which the first decode step overwrites before reading it
        noise_stand_in = torch.full((B, V), 0.5, device=device) if dc.do_sample else None  # the rows' RNG untouched
        with warmup:
            # inputs made as the loop makes them, so that the graph compiled here is the one the loop runs
            step_fn(model, amateur, readout, tokens[:, -1].clone(memory_format=torch.contiguous_format)[:, None],
                    torch.tensor([T], device=device), span(T + 1), pad, seen, noise_stand_in, dc)
        t_compile, t0 = time.perf_counter() - t0, time.perf_counter()
    # prefill: the whole left-padded prompt [B, T] through the same (eager) step, then one token at a time
    token, chosen, _ = decode_step(model, amateur, readout, tokens, all_slots[:T], span(T), pad, seen, noise(), dc)
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = 0
    for step in range(max_new_tokens):
        ids, picks = token.tolist(), chosen.tolist()  # the one host sync per token
        if min(ids) < 0:
            raise LcdError(f"generate: the model's scores for prompt {ids.index(min(ids))} are NaN or infinite at new "
                           f"token {step} (weights that overflow {model.dtype}?)")
        for i in range(B):
            if not live[i]:
                continue
            out[i].append(ids[i])
            layers[i].append(dc.exit_layers[picks[i]] if dc.method == "dola" else -1)
            if ids[i] in eos_ids:
                live[i], reasons[i] = False, "eos"
        if on_tokens is not None:
            for i, stop in enumerate(on_tokens(ids, live)):
                if stop and live[i]:
                    live[i], reasons[i] = False, "stop"
        steps += 1
        if not any(live) or step == max_new_tokens - 1:
            break
        seen.scatter_(1, token[:, None], True)
        slot = torch.tensor([T + step], device=device)
        t_call = time.perf_counter()
        with guards_checked(step) if step_fn is not decode_step else contextlib.nullcontext():  # eager: no Dynamo
            token, chosen, _ = step_fn(model, amateur, readout, token[:, None], slot, span(T + step + 1), pad,
                                    seen, noise(), dc)
        if warm_after_first and step == 0:  # the step's load (and its first call) is compile time
            t_compile = time.perf_counter() - t_call
        if device.type == "cuda":  # a CUDA graph's outputs live in its pool, which its next replay overwrites
            token, chosen = token.clone(), chosen.clone()
    t_decode = time.perf_counter() - t1 - (t_compile if warm_after_first else 0.0)
    stats = {"prefill_seconds": t_prefill, "compile_seconds": t_compile, "decode_seconds": t_decode,
             "decode_steps": steps - 1, "prompt_tokens": T, "batch": B}
    return out, reasons, layers, stats


@dataclass(frozen=True)
class ScoreConfig:
    """One likelihood-scoring recipe (see score_ids); several share one forward pass."""

    method: str = "greedy"
    exit_layers: tuple[int, ...] = ()
    exit_norm: bool = True
    alpha: float = 0.1  # ACD's plausibility
    relative_top: float = 0.1  # DoLa / CD: mask outside the relative-top set (0: no mask)
    relative_top_value: float = -1000.0
    post_softmax: bool = True
    beta: float | None = None
    amateur_temperature: float = 1.0
    special_ids: tuple[int, ...] = ()  # ACD: tokens kept out of the contrast
    exit_heads: str = ""  # as DecodeConfig's


def method_log_scores(
    model: Transformer, final: Tensor, exits: Tensor | None, layers: tuple[int, ...], amateur_logits: Tensor | None,
    readout: Readout | None, sc: ScoreConfig,
) -> Tensor:
    """Per-position log-scores [M, V] for scoring: `final` [M, E], `exits` [len(layers), M, C].

    greedy: log p_e. acd: log q. dola: DoLa's released scoring — per position the JS-chosen layer,
    log p_e - log p_j, then log_softmax if `post_softmax`, then `relative_top_value` outside the
    relative-top set if `relative_top` > 0. cd: the same recipe with the amateur model's log-probs."""
    expert = model.logits(final).float()
    if sc.method == "greedy":
        return expert.log_softmax(-1)
    hidden = None if exits is None else exits[[layers.index(j) for j in sc.exit_layers]]
    if sc.method == "acd":
        return contrast.acd_log_probs(expert, exit_logits(model, hidden, sc.exit_norm, readout)[0], sc.alpha,
                                      special=special_mask(sc.special_ids, expert))
    if sc.method == "dola":
        candidates = exit_logits(model, hidden, sc.exit_norm, readout)  # [L, M, V]
        chosen = select_layer_fused()(expert, candidates)
        base = candidates.gather(0, chosen[None, :, None].expand(1, *expert.shape))[0].log_softmax(-1)
    else:
        base = (amateur_logits / sc.amateur_temperature).log_softmax(-1)
    expert_logp = expert.log_softmax(-1)
    if sc.method == "cd" and sc.beta is not None:
        scores = (1 + sc.beta) * expert - sc.beta * amateur_logits
    else:
        scores = expert_logp - base
    if sc.post_softmax:
        scores = scores.log_softmax(-1)
    if sc.relative_top > 0:
        scores = torch.where(contrast.plausible_mask(expert_logp, sc.relative_top), scores, sc.relative_top_value)
    return scores


def prefix_kv(model: Transformer, prefix: list[int], S: int, cache: dict) -> list[tuple[Tensor, Tensor]]:
    """K/V [1, K, P, D] per layer of a token prefix, reusing the longest common start of a cached one.

    `cache` maps (model id, prefix tokens) -> K/V and keeps the two most recent per model. Attention is
    causal, so a cached prefix's K/V is valid up to where its tokens first differ: a few-shot demo is
    computed once and each question after it only from where it starts."""
    device = model.device

    def shared_start(tokens: tuple) -> int:
        n = 0
        while n < min(len(tokens), len(prefix)) and tokens[n] == prefix[n]:
            n += 1
        return n

    mine = [key for key in cache if key[0] == id(model)]
    base = max(mine, key=lambda key: shared_start(key[1]), default=None)
    start = 0 if base is None else min(shared_start(base[1]), len(prefix) - 1)
    model.setup_caches(1, S)
    if start > 0:
        for blk, (k, v) in zip(model.layers, cache[base]):
            blk.attention.kv_cache.k[:, :, :start] = k[:, :, :start]
            blk.attention.kv_cache.v[:, :, :start] = v[:, :, :start]
    P = len(prefix)
    if start < P:
        model(torch.tensor([prefix[start:]], device=device), torch.arange(start, P, device=device),
              torch.zeros(1, dtype=torch.long, device=device))
    saved = [(blk.attention.kv_cache.k[:, :, :P].clone(), blk.attention.kv_cache.v[:, :, :P].clone())
             for blk in model.layers]
    key = (id(model), tuple(prefix))
    cache.pop(key, None)
    cache[key] = saved
    for old in [key for key in cache if key[0] == id(model)][:-2]:
        del cache[old]
    return saved


@functools.cache
def select_layer_fused() -> Callable:
    """dola_select_layer compiled for any shape: scoring runs it on [L, M, V] with M in the hundreds, where
    eager makes ~10 passes over gigabytes of temporaries and the fused kernel one (8x faster on CPU)."""
    return torch.compile(contrast.dola_select_layer, dynamic=True)


SCORE_POSITIONS = 512  # continuation positions scored at once (DoLa's candidates: [L, 512, V] floats)


@torch.inference_mode()
def score_ids(
    model: Transformer,
    prompts: list[list[int]],
    continuations: list[list[int]],
    configs: list[ScoreConfig],
    readout_of: Callable[[ScoreConfig], Readout | None] | None = None,
    amateur: Transformer | None = None,
    prefix_cache: dict | None = None,
    greedy: bool = False,
) -> list[list[float]] | list[list[tuple[float, bool]]]:
    """Sum of each continuation's per-token log-scores after its prompt, for every config: [config][row];
    `greedy`: (sum, whether every continuation token is its position's best under the config's scores) per row.

    Rows are right-padded (real tokens never see the padding, so no mask is needed), and the prompts'
    longest shared token prefix (e.g. a few-shot demo) runs once and is copied into every row's cache;
    `prefix_cache` keeps that prefix's K/V per model across calls (the last prefix only)."""
    device = model.device
    shared = min(len(p) for p in prompts) - 1
    for p in prompts:
        shared = next((k for k in range(shared) if p[k] != prompts[0][k]), shared)
    prefix = prompts[0][:shared]
    rows = [p[shared:] + c for p, c in zip(prompts, continuations)]
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.full((B, T), model.config.pad_token_id or 0, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    tokens, pad = tokens.to(device), torch.zeros(B, dtype=torch.long, device=device)
    layers = tuple(sorted({j for sc in configs for j in sc.exit_layers}))
    if not any(sc.method == "cd" for sc in configs):
        amateur = None  # run only for CD's scores
    S = cache_length(shared + T, 1 << 30)
    outs = []
    for m in (model, amateur):
        if m is None:
            continue
        saved = prefix_kv(m, prefix, S, prefix_cache if prefix_cache is not None else {}) if shared else None
        m.setup_caches(B, S)
        if shared:
            for blk, (k, v) in zip(m.layers, saved):
                blk.attention.kv_cache.k[:, :, :shared] = k
                blk.attention.kv_cache.v[:, :, :shared] = v
        outs.append(m(tokens, torch.arange(shared, shared + T, device=device), pad, layers if m is model else ()))
    (final, exits), amateur_final = outs[0], outs[1][0] if amateur is not None else None
    # the positions that predict continuation tokens, flattened over rows: M of them
    row_of = torch.tensor([i for i, c in enumerate(continuations) for _ in c], device=device)
    pos = torch.tensor([len(p) - shared - 1 + k for p, c in zip(prompts, continuations) for k in range(len(c))],
                       device=device)
    target = torch.tensor([t for c in continuations for t in c], device=device)
    final_m = final[row_of, pos]  # [M, E]
    exits_m = None if exits is None else exits[:, row_of, pos]  # [L, M, C]
    amateur_m = None if amateur_final is None else amateur_final[row_of, pos]  # [M, E']
    readouts = [readout_of(sc) if readout_of is not None else None for sc in configs]
    picked, best = [[] for _ in configs], [[] for _ in configs]  # per config: [M] scores and argmaxes
    for at in range(0, len(target), SCORE_POSITIONS):  # SCORE_POSITIONS at a time: a method's [L, M, V] stays bounded
        part = slice(at, at + SCORE_POSITIONS)
        amateur_logits = None if amateur_m is None else amateur.logits(amateur_m[part]).float()
        for k, (sc, readout) in enumerate(zip(configs, readouts)):
            scores = method_log_scores(model, final_m[part], None if exits_m is None else exits_m[:, part], layers,
                                       amateur_logits, readout, sc)
            picked[k].append(scores.gather(-1, target[part, None])[:, 0])
            if greedy:
                best[k].append(scores.argmax(-1))  # ties go to the lowest id, as the harness's HF model
    results = []
    for k, sc in enumerate(configs):
        picked_k = torch.cat(picked[k])
        totals = torch.zeros(B, dtype=picked_k.dtype, device=device).index_add_(0, row_of, picked_k).tolist()
        if not all(map(math.isfinite, totals)):  # finite logits give finite log-likelihoods under every method
            raise LcdError(f"score: the model's {sc.method} log-likelihoods are NaN or infinite (weights that overflow "
                           f"{model.dtype}?)")
        if greedy:  # a row is greedy when each of its tokens is its position's argmax
            misses = torch.zeros(B, device=device).index_add_(0, row_of, (torch.cat(best[k]) != target).float())
            totals = list(zip(totals, (misses == 0).tolist()))
        results.append(totals)
    return results
