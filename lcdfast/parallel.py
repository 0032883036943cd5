"""torch.distributed for lcdfast: the ranks torchrun starts, items shared out among them (data parallelism), and
one model split over them (tensor parallelism, gpt-fast's scheme).

Data parallelism: evaluate.run_resumable hands out chunks of items from a counter in torchrun's store (whichever
rank is free takes the next), each rank appends its records to its own shard file, and rank 0 merges the shards
into the file one process writes. Tensor parallelism: `shard_model` keeps each rank's heads, MLP columns and
vocabulary rows; row-parallel projections end in an all-reduce, and the head's logits are gathered only where the
contrast needs them (generate.contrast_scores, contrast.acd_log_probs_masked).

Shapes: B rows, V vocab, Vr a rank's vocabulary rows (ceil(V / N)), E head width, L layers, N ranks.
"""

import itertools
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import LcdError

STORE_POLL_S = 0.25  # how often rank 0 reads the job's progress while it waits for the others


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) once; (rank, world size), (0, 1) alone."""
    import torch.distributed as dist

    if not launched():
        return 0, 1
    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise LcdError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {key} is not set (launch with torchrun)")
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if launched() and dist.is_initialized() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if launched() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def data_ranks() -> int:
    """How many ranks share out the items: all of them, unless they hold one model between them (tensor parallel:
    then every rank runs every item and rank 0 writes)."""
    return 1 if _split_model else world()


_split_model = False  # set by shard_model


def device_of(device: str) -> str:
    """The device a rank runs on: its own GPU (LOCAL_RANK) when several ranks share a node's CUDA devices."""
    if str(device) == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def barrier() -> None:
    import torch.distributed as dist

    if world() > 1:
        dist.barrier()


def same_everywhere(error: str | None) -> None:
    """Rank 0's outcome of a step only it ran (None: fine), raised as an LcdError on every rank alike."""
    import torch.distributed as dist

    if world() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise LcdError(error)


def all_reduce_int(n: int) -> int:
    """The sum of `n` over the ranks."""
    import torch.distributed as dist

    t = torch.tensor(n, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t)


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _key(name: str) -> str:
    """A store key unique to this launch: torchrun keeps its store across the restarts of one job."""
    return f"lcdfast/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def new_job(name: str) -> str:
    """A name for one data-parallel loop, the same on every rank (each makes its calls in the same order)."""
    return f"{next(_jobs)}:{name}"


_jobs = itertools.count()


def claimed(n_chunks: int, job: str) -> Iterator[int]:
    """Chunk indices 0..n_chunks-1 for this rank: each rank takes the next unclaimed one from the store when it is
    free, so a rank with shorter items takes more of them and none waits on a fixed share."""
    store, key = _store(), _key(f"{job}/next")
    while (k := store.add(key, 1) - 1) < n_chunks:
        yield k


def add_done(job: str, n: int) -> int:
    """Count n more items done for the whole job; returns the job's total so far."""
    return _store().add(_key(f"{job}/done"), n)


def wait_done(job: str, total: int, on_progress) -> None:
    """Rank 0, its own chunks finished: follow the others' progress until the job's items are all done."""
    while (done := add_done(job, 0)) < total:
        on_progress(done)
        time.sleep(STORE_POLL_S)
    on_progress(done)


# ---- tensor parallelism ----------------------------------------------------------------------------------------

class VocabShard(NamedTuple):
    """A rank's rows of the head: vocabulary ids [start, start + rows), the last rank's past V padded with zeros."""

    start: int
    rows: int  # Vr = ceil(V / N), the same on every rank
    vocab: int  # V
    group: object  # the process group


def all_reduce(x: Tensor, group) -> Tensor:
    """Sum over the ranks (traced by torch.compile: the functional collective)."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def gather_vocab(x: Tensor, shard: VocabShard) -> Tensor:
    """Every rank's logits side by side: [..., Vr] -> [..., V] (the padding rows dropped)."""
    import torch.distributed._functional_collectives as funcol

    full = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), x.dim() - 1, shard.group))
    return full[..., :shard.vocab]


def gather_stats(x: Tensor, shard: VocabShard) -> Tensor:
    """[...] from each rank stacked: [N, ...]."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single(x[None].contiguous(), 0, shard.group))


def shard_valid(shard: VocabShard, device) -> Tensor:
    """[Vr] bool: which of this rank's rows are real vocabulary (not the last rank's padding)."""
    return torch.arange(shard.start, shard.start + shard.rows, device=device) < shard.vocab


def sharded_log_softmax(logits: Tensor, shard: VocabShard) -> Tensor:
    """log_softmax over the whole vocabulary of vocabulary-sharded logits [..., Vr] (padding rows -inf): each
    rank's max and sum of exponentials gathered (one [N, 2, ...] collective), combined by log-sum-exp."""
    logits = torch.where(shard_valid(shard, logits.device), logits, -torch.inf)
    top = logits.amax(-1)
    sums = (logits - top[..., None]).exp().sum(-1)
    stats = gather_stats(torch.stack([top, sums]), shard)  # [N, 2, ...]
    lse = (stats[:, 0] + stats[:, 1].log()).logsumexp(0)
    return logits - lse[..., None]


def sharded_js_divergence(final_logits: Tensor, layer_logits: Tensor, shard: VocabShard) -> Tensor:
    """contrast.js_divergence over vocabulary-sharded logits: final [B, Vr], layers [L, B, Vr] -> [L, B] on every
    rank. Moves the normalizers ([N, 2, 1 + L, B]) and the per-rank partial sums ([L, B]), not the logits."""
    logp = sharded_log_softmax(torch.cat([final_logits[None], layer_logits]), shard)  # [1 + L, B, Vr]
    logp_final, logp_layers = logp[:1], logp[1:]
    mean = 0.5 * (logp_final.exp() + logp_layers.exp())
    terms = torch.xlogy(mean, mean) - 0.5 * mean * (logp_final + logp_layers)
    terms = torch.where(shard_valid(shard, logp.device), terms, 0.0)  # the padding's -inf log-probs give NaN
    return all_reduce(terms.sum(-1), shard.group) / shard.vocab


def check_shardable(model: nn.Module, n: int) -> None:
    cfg = model.config
    if model.quantization:
        raise LcdError(f"--tp {n}: quantized weights ({model.quantization}) can't be split over ranks yet; load them "
                       "as float")
    if cfg.n_kv_heads < n:
        raise LcdError(f"--tp {n}: the model's {cfg.n_kv_heads} key/value heads can't give each of {n} ranks one")


def _span(count: int, r: int, n: int) -> tuple[int, int]:
    """Rank r's [start, end) of `count` units split as evenly as whole units allow."""
    return r * count // n, (r + 1) * count // n


def _rows(t: Tensor, parts: list[tuple[int, int, int]]) -> Tensor:
    """Rows [lo, hi) of each consecutive block of `size` rows, parts = [(size, lo, hi)] (fused q|k|v, gate|up),
    concatenated."""
    blocks, at = [], 0
    for size, lo, hi in parts:
        blocks.append(t[at + lo:at + hi])
        at += size
    return torch.cat(blocks).clone()


def _keep(module: nn.Module, name: str, value: Tensor | None) -> None:
    setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=False))


def shard_model(model: nn.Module, group=None) -> nn.Module:
    """Keep this rank's part of a float Transformer, in place (gpt-fast's scheme): each block's key/value heads
    with the query heads that read them and its feed-forward columns (split as evenly as whole heads allow: SmolLM2's
    3 key/value heads go 1 and 2 over 2 ranks) (wqkv, w13 split by rows), wo and w2 split by columns and followed by an
    all-reduce (their biases added on rank 0 alone), the head's vocabulary rows (model.vocab_shard); embeddings,
    norms and OPT's projections whole. A tied head keeps a whole copy as the embedding table."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    r, n = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.config
    check_shardable(model, n)
    H, K, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    k0, k1 = _span(K, r, n)  # this rank's key/value heads, and the query heads that read them
    q0, q1 = k0 * (H // K), k1 * (H // K)
    f0, f1 = _span(F, r, n)
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        qkv = [(H * D, q0 * D, q1 * D), (K * D, k0 * D, k1 * D), (K * D, k0 * D, k1 * D)]
        _keep(attn.wqkv, "weight", _rows(attn.wqkv.weight, qkv))
        _keep(attn.wqkv, "bias", None if attn.wqkv.bias is None else _rows(attn.wqkv.bias, qkv))
        _keep(attn.wo, "weight", attn.wo.weight[:, q0 * D:q1 * D].clone())
        _keep(attn.wo, "bias", attn.wo.bias if r == 0 else None)
        attn.n_heads, attn.n_kv_heads, attn.group = q1 - q0, k1 - k0, group
        up = [(F, f0, f1)] * (2 if cfg.gated_mlp else 1)
        _keep(ffn.w13, "weight", _rows(ffn.w13.weight, up))
        _keep(ffn.w13, "bias", None if ffn.w13.bias is None else _rows(ffn.w13.bias, up))
        _keep(ffn.w2, "weight", ffn.w2.weight[:, f0:f1].clone())
        _keep(ffn.w2, "bias", ffn.w2.bias if r == 0 else None)
        ffn.group = group
    head = model.output.weight  # [V, E]
    if model.tok_embeddings is None:  # tied: the table stays whole for the input side
        model.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_dim, _weight=head.detach(), _freeze=True)
    V = cfg.vocab_size
    rows = -(-V // n)
    mine = head[r * rows:min((r + 1) * rows, V)]
    padded = torch.zeros(rows, head.shape[1], dtype=head.dtype, device=head.device)
    padded[:mine.shape[0]] = mine
    _keep(model.output, "weight", padded)
    model.vocab_shard = VocabShard(r * rows, rows, V, group)
    global _split_model
    _split_model = True
    model.max_batch = model.max_seq_len = -1  # caches are made again with this rank's heads
    return model
