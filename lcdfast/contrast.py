"""The contrast math of DESIGN.md §2-3, one function per formula. All inputs and outputs are float32.

Shapes: B rows, V vocab, L candidate layers. `*_logits` are raw head outputs [.., V].
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .kernels import csrc_on
from .model import linear, realized, softcapped
from .parallel import VocabShard, all_reduce, gather_vocab
from .quant import QuantWeight, quantize_activations, weight_rows


def plausible_mask(expert_logp: Tensor, alpha: float, min_tokens_to_keep: int = 1) -> Tensor:
    """V_head: p_e(x) >= alpha * max p_e, and at least the top `min_tokens_to_keep` tokens. [B, V] bool."""
    return expert_logp >= head_threshold(expert_logp, alpha, min_tokens_to_keep)


def head_threshold(expert_logp: Tensor, alpha: float, min_tokens_to_keep: int) -> Tensor:
    """The smallest log p_e in V_head [B, 1]: log(alpha * max p_e), lowered to the k-th best when k > 1."""
    best = expert_logp.max(-1, keepdim=True).values
    if min_tokens_to_keep <= 1:  # the k-th best is the max: no top-k pass over the vocabulary
        return torch.minimum(best + math.log(alpha), best)
    return torch.minimum(best + math.log(alpha), expert_logp.topk(min_tokens_to_keep, dim=-1).values[..., -1:])


def acd_log_probs(
    expert_logits: Tensor, amateur_logits: Tensor, alpha: float = 0.1, min_tokens_to_keep: int = 1,
    special: Tensor | None = None,
) -> Tensor:
    """ACD (autocontrastive-gen): log q, a full normalized distribution [B, V].

    On V_head, q = softmax_{V_head}(log p_e - log p_a) * p_e(V_head); elsewhere q = p_e.
    The amateur's normalizer cancels in the softmax, so raw amateur logits suffice on V_head.
    `special` [V] bool: tokens kept out of the contrast — they keep p_e, and the contrast redistributes
    p_e(V_head minus them) over the rest of V_head (None: the reference formula).
    """
    expert_logp = expert_logits.log_softmax(-1)
    mask = plausible_mask(expert_logp, alpha, min_tokens_to_keep)
    if special is not None:
        mask = mask & ~special
    contrast = torch.where(mask, expert_logp - amateur_logits, -math.inf)
    head_mass = torch.where(mask, expert_logp, -math.inf).logsumexp(-1, keepdim=True)  # log p_e(V_head)
    return torch.where(mask, contrast.log_softmax(-1) + head_mass, expert_logp)


def amateur_logits_at(hidden: Tensor, head: Tensor | QuantWeight, token_ids: Tensor) -> Tensor:
    """The masked contrast op's core: head logits only at `token_ids` [B, K], from hidden [B, E] and a head
    weight [V, E] (float, or quantized: then only those rows are dequantized). Reads K rows of the head instead of
    all V. The fused op returns float32 (an a8 head's hidden on the int8 grid, as its full product takes it)."""
    if isinstance(head, QuantWeight):
        hidden = quantize_activations(hidden) if head.a8 else hidden.float()
        return torch.einsum("be,bke->bk", hidden, weight_rows(head, token_ids))
    if csrc_on(hidden.device):  # csrc/, when built (kernels.py)
        return torch.ops.lcdfast.masked_logits(hidden, head, token_ids)
    return torch.einsum("be,bke->bk", hidden, head[token_ids])


def acd_log_probs_masked(
    expert_logits: Tensor, amateur_hidden: Tensor, head: Tensor, alpha: float = 0.1, min_tokens_to_keep: int = 1,
    candidates: int = 64, special: Tensor | None = None, softcap: float = 0.0, shard: VocabShard | None = None,
) -> Tensor:
    """acd_log_probs with the amateur's logits computed only on V_head (DESIGN.md §4.3). [B, V].
    `head` is an LM head weight [V, E], float or quantized; `softcap`: the model's final soft-capping, applied to
    the amateur's logits as to the expert's (elementwise, so on the candidates alone too). `shard`: `head` holds
    only this rank's vocabulary rows (tensor parallel): each rank scores the candidates it holds and one
    all-reduce of [B, K] brings them together (the full projection's fallback gathers [B, V]).

    V_head is a prefix of the expert's ranking, so when it fits in the top `candidates` tokens those are
    all the amateur must score; when any row's V_head is larger, the full projection runs instead (exact)."""
    expert_logp = expert_logits.log_softmax(-1)
    threshold = head_threshold(expert_logp, alpha, min_tokens_to_keep)
    head_size = (expert_logp >= threshold).sum(-1)  # [B]

    def on_candidates(expert_logp: Tensor, amateur_hidden: Tensor, head: Tensor, threshold: Tensor) -> Tensor:
        top_logp, top_ids = expert_logp.topk(candidates, dim=-1)  # [B, K]
        in_head = top_logp >= threshold
        if special is not None:
            in_head = in_head & ~special[top_ids]
        if shard is None:
            amateur_logits = amateur_logits_at(amateur_hidden, head, top_ids).float()
        else:  # zero where another rank holds the token, then summed over the ranks
            local = top_ids - shard.start
            mine = (local >= 0) & (local < shard.rows)
            at = amateur_logits_at(amateur_hidden, head, local.clamp(0, shard.rows - 1)).float()
            amateur_logits = all_reduce(torch.where(mine, at, 0.0), shard.group)
        amateur_logits = softcapped(amateur_logits, softcap)
        contrast = torch.where(in_head, top_logp - amateur_logits, -math.inf)
        head_mass = torch.where(in_head, top_logp, -math.inf).logsumexp(-1, keepdim=True)
        return expert_logp.scatter(1, top_ids, torch.where(in_head, contrast.log_softmax(-1) + head_mass, top_logp))

    def on_vocab(expert_logp: Tensor, amateur_hidden: Tensor, head: Tensor, threshold: Tensor) -> Tensor:
        mask = expert_logp >= threshold
        if special is not None:
            mask = mask & ~special
        amateur_logits = linear(amateur_hidden, head)
        amateur_logits = softcapped((amateur_logits if shard is None else gather_vocab(amateur_logits, shard)).float(),
                                    softcap)
        contrast = torch.where(mask, expert_logp - amateur_logits, -math.inf)
        head_mass = torch.where(mask, expert_logp, -math.inf).logsumexp(-1, keepdim=True)
        return torch.where(mask, contrast.log_softmax(-1) + head_mass, expert_logp)

    if candidates >= expert_logp.shape[-1]:
        return on_vocab(expert_logp, amateur_hidden, head, threshold)
    return branch(head_size.max() > candidates, on_vocab, on_candidates,
                  (expert_logp, amateur_hidden, head, threshold))


def branch(pred: Tensor, if_true, if_false, operands: tuple) -> Tensor:
    """torch.cond under torch.compile (no host sync in the step); eager, a Python `if` (torch.cond run eagerly
    imports Dynamo, a second and a half of start-up)."""
    if not torch.compiler.is_compiling():
        return (if_true if pred else if_false)(*operands)
    # realized: inductor (torch 2.13) may lay out cond's operands in an order its branch graphs don't expect
    # cond takes tensors only: the operands flattened (a QuantWeight into its tensors; a None or its a8 flag kept as
    # a constant), rebuilt inside
    leaves, spec = pytree.tree_flatten(operands)
    kept = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]

    def rebuilt(fn: Callable) -> Callable:
        def call(*tensors: Tensor) -> Tensor:
            full = list(leaves)
            for i, t in zip(kept, tensors):
                full[i] = t
            return fn(*pytree.tree_unflatten(full, spec))
        return call

    return torch.cond(pred, rebuilt(if_true), rebuilt(if_false), tuple(realized(leaves[i]) for i in kept))


def js_divergence(final_logits: Tensor, layer_logits: Tensor) -> Tensor:
    """DoLa's Jensen-Shannon divergence per layer and row, averaged over the vocabulary. [B, V], [L, B, V] -> [L, B].

    As transformers and the paper's code compute it: 0.5 * (KL(m || p) + KL(m || q)) with m = (p + q) / 2, each
    term averaged over V. Summed as m log m - m (log p + log q) / 2, with the final layer's p and log p computed
    once and each layer's exponentials kept from its normalizer's sum: one exp and one log per layer and token
    (compiled, a plain log_softmax recomputes both per layer and use: 1.47 -> 1.18 ms for 8 x 49152).
    On CPU with csrc built, its fused op instead (two passes over the logits where inductor makes about thirty)."""
    if final_logits.device.type == "cpu" and csrc_on(final_logits.device):
        return torch.ops.lcdfast.js_divergence(final_logits.float(), layer_logits.float())
    logp_final = realized(final_logits.log_softmax(-1))[None]  # [1, B, V]
    p_final = realized(logp_final.exp())
    shifted = layer_logits - layer_logits.amax(-1, keepdim=True)  # [L, B, V]
    exp_layer = realized(shifted.exp())
    total = exp_layer.sum(-1, keepdim=True)
    mean = 0.5 * (p_final + exp_layer / total)
    return (torch.xlogy(mean, mean) - 0.5 * mean * (logp_final + shifted - total.log())).mean(-1)


def dola_select_layer(final_logits: Tensor, layer_logits: Tensor, batch_mode: bool = False) -> Tensor:
    """Index into the candidate layers of the most distant one, per row [B] (or one for the batch, repeated)."""
    return most_distant(js_divergence(final_logits, layer_logits), batch_mode)


def most_distant(js: Tensor, batch_mode: bool = False) -> Tensor:
    """The candidate of largest divergence js [L, B] per row [B] (batch_mode: of largest mean, for every row)."""
    if batch_mode:
        return js.mean(-1).argmax().expand(js.shape[1])
    return js.argmax(0)


def dola_scores(
    final_logits: Tensor,
    premature_logits: Tensor,
    relative_top: float = 0.1,
    min_tokens_to_keep: int = 1,
    masked_value: float = -math.inf,
) -> Tensor:
    """DoLa: log p_e - log p_j on V_head, `masked_value` elsewhere (transformers' generate: -inf). [B, V]."""
    final_logp, premature_logp = final_logits.log_softmax(-1), premature_logits.log_softmax(-1)
    diff = final_logp - premature_logp
    if relative_top <= 0:
        return diff
    return torch.where(plausible_mask(final_logp, relative_top, min_tokens_to_keep), diff, masked_value)


def cd_scores(
    expert_logits: Tensor,
    amateur_logits: Tensor,
    alpha: float = 0.1,
    beta: float | None = None,
    amateur_temperature: float = 1.0,
    min_tokens_to_keep: int = 1,
    special: Tensor | None = None,
) -> Tensor:
    """Contrastive decoding with a separate amateur model, -inf outside V_head. [B, V].

    Plain (Li et al.): log p_e - log p_a(z_a / tau). Beta form (O'Brien & Lewis): (1 + beta) z_e - beta z_a.
    `special` [V] bool: tokens kept out of the contrast: each gets the score at which softmax over V_head gives it
    p_e, the rest of V_head keeping its scores (so sharing the remaining mass as before); with no special token in
    V_head the scores are the reference's (None: the reference always).
    """
    expert_logp = expert_logits.log_softmax(-1)
    mask = plausible_mask(expert_logp, alpha, min_tokens_to_keep)
    if beta is None:
        scores = expert_logp - (amateur_logits / amateur_temperature).log_softmax(-1)
    else:
        scores = (1 + beta) * expert_logits - beta * amateur_logits
    if special is None:
        return torch.where(mask, scores, -math.inf)
    kept, contrasted = mask & special, mask & ~special
    kept_mass = torch.where(kept, expert_logp, -math.inf).logsumexp(-1, keepdim=True).exp()  # p_e(kept) [B, 1]
    contrast_lse = torch.where(contrasted, scores, -math.inf).logsumexp(-1, keepdim=True)
    # softmax gives a kept token exp(s) / (exp(lse) / (1 - K)): p_e when s = log p_e + lse - log(1 - K)
    kept_scores = expert_logp + contrast_lse - torch.log1p(-kept_mass.clamp(max=1 - 1e-6))
    kept_scores = torch.where(contrasted.any(-1, keepdim=True), kept_scores, expert_logp)
    return torch.where(contrasted, scores, torch.where(kept, kept_scores, -math.inf))


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' rule on seen tokens: negative scores times penalty, positive ones divided. seen: [B, V] bool."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def sampling_log_probs(scores: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (transformers' order), as log-probs with -inf on removed tokens."""
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs = scores.softmax(-1)
        top = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1).values  # [B, K], descending

        def on_candidates(probs: Tensor, top: Tensor) -> Tensor:
            return nucleus_threshold(top, top_p)

        def on_vocab(probs: Tensor, top: Tensor) -> Tensor:
            return nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p)

        # the nucleus lies within the top K when their mass reaches top_p; else sort the whole vocabulary (exact)
        fits = (top.cumsum(-1)[..., -1] >= top_p).all()
        threshold = branch(fits, on_candidates, on_vocab, (probs, top))
        scores = scores.masked_fill(probs < threshold, -math.inf)
    return scores.log_softmax(-1)


TOP_P_CANDIDATES = 512  # SmolLM2 at temperature 0.8: 99% of top-0.95 nuclei hold <= 338 tokens


def nucleus_threshold(probs_desc: Tensor, top_p: float) -> Tensor:
    """Top-p's smallest kept probability [B, 1] from probabilities sorted descending [B, K]: the nucleus is the
    shortest prefix whose mass reaches top_p (tokens tied with its last one are kept too)."""
    ahead = probs_desc.cumsum(-1) - probs_desc  # mass strictly ahead of each token; 0 for the best
    n_keep = (ahead < top_p).sum(-1, keepdim=True)  # >= 1
    return probs_desc.gather(-1, n_keep - 1)
