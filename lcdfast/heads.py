"""Amateurs for any checkpoint: fitted lenses and trained exit heads, their files, and the automatic layer.

A *lens* for layer l is an affine translator T_l(h) = A_l h + b_l on the residual stream [C] -> [C], read
through the model's own final norm and head: fitted by least squares of h[N] on h[l] (Din et al. 2023), and
optionally refined by the tuned-lens objective, KL(p_N || p_lens) (Belrose et al. 2023). A *trained head* for
layer l replaces the shared head: a [V, E] matrix after the final norm, trained by next-token cross-entropy
with the model frozen (Gera et al. 2023's multi-exit heads, the layout `lm_head_<l>.weight` of their release).

Shapes: R rows of T tokens, M = R * T tokens of a batch, C width, E head width, V vocab, L chosen layers.
"""

import csv
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import finite
from .errors import LcdError
from .model import Transformer, softcapped
from .parallel import all_reduce
from .quant import dense, weight_rows

FORMAT = "lcdfast-exit-heads/1"
TEXT_FIELDS = ("text", "question", "prompt", "full_prefix", "context", "passage")
SEQ_LEN = 512  # tokens per row of the fitting data: passages are packed end to end, an EOS between them
DEV_TOKENS = 1024  # held out of the fit: the per-layer statistics (and the automatic layer) are measured on them
AUTO_AGREEMENT = 2 / 3  # the automatic amateur's top-1 agreement with the final layer (see auto_layer)


# ---- data ------------------------------------------------------------------------------------------------------

def read_texts(paths: list[str | Path]) -> list[str]:
    """Texts from JSONL / JSON (a list of objects) / CSV files (the first of TEXT_FIELDS present), or plain text."""
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LcdError(f"--data: {path} is not a file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LcdError(f"--data: {path} is not UTF-8 text ({e})") from None
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            records = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise LcdError(f"--data: {path}:{n}: not valid JSON ({e})") from None
        elif path.suffix.lower() == ".json":
            try:
                records = json.loads(raw)
            except json.JSONDecodeError as e:
                raise LcdError(f"--data: {path}: not valid JSON ({e})") from None
            records = records if isinstance(records, list) else [records]
        elif path.suffix.lower() == ".csv":
            records = list(csv.DictReader(raw.splitlines()))
        else:
            texts += [raw] if raw.strip() else []
            continue
        found = [t for t in (text_of(r) for r in records) if t]
        if not found:
            raise LcdError(f"--data: {path}: no record has a text field (one of {', '.join(TEXT_FIELDS)})")
        texts += found
    if not texts:
        raise LcdError("--data: no text in " + ", ".join(map(str, paths)))
    return texts


def text_of(record) -> str | None:
    if not isinstance(record, dict):
        return record if isinstance(record, str) else None
    return next((record[k] for k in TEXT_FIELDS if isinstance(record.get(k), str) and record[k].strip()), None)


def token_rows(tokenizer, texts: list[str], max_tokens: int, seq_len: int = SEQ_LEN) -> Tensor:
    """The texts' tokens packed end to end (EOS between passages), cut into rows [R, T] up to max_tokens."""
    sep = tokenizer.eos_token_ids[:1]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text) + sep
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    T = min(seq_len, len(stream))
    if T < 2:
        raise LcdError(f"--data: {len(stream)} tokens are too few to fit on")
    return torch.tensor(stream[: len(stream) // T * T]).view(-1, T)


def row_length(model: Transformer) -> int:
    """SEQ_LEN, or fewer where the model's learned positions end sooner (GPT-2's n_positions)."""
    return min(SEQ_LEN, model.config.max_positions) if model.config.positions == "learned" else SEQ_LEN


def split_dev(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The rows to fit on and the last rows (DEV_TOKENS, at most a quarter; none if two rows or fewer) held out for
    the statistics."""
    held = min(-(-DEV_TOKENS // rows.shape[1]), len(rows) // 4) if len(rows) > 2 else 0
    return rows[: len(rows) - held], rows[len(rows) - held:]


def batches(rows: Tensor, tokens_per_batch: int) -> list[Tensor]:
    per = max(1, tokens_per_batch // rows.shape[1])
    return [rows[i:i + per] for i in range(0, len(rows), per)]


def hidden_states(model: Transformer, rows: Tensor, layers: tuple[int, ...],
                  logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """The residual streams [L, R, T, C] at `layers`, and with `logits` the final layer's [R, T, V] (float32;
    the head's product is about a fifth of SmolLM2's forward pass, so only the statistics ask for it)."""
    R, T = rows.shape
    device = model.device
    model.setup_caches(R, T)
    final, exits = model(rows.to(device), torch.arange(T, device=device), torch.zeros(R, dtype=torch.long,
                                                                                          device=device), layers)
    return exits.float(), model.logits(final).float() if logits else None


def progress_bar(show: bool):
    """A progress bar on stderr (none when `show` is False)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not show)


# ---- the file: kind, model fingerprint, tensors ----------------------------------------------------------------

def fingerprint(model: Transformer) -> dict:
    """What ties a file to its model: a hash of the shape-defining config, and the norms of 32 head rows (close
    across dtypes, different between models)."""
    cfg = model.config
    shape = {k: getattr(cfg, k) for k in ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                           "head_dim", "hidden_dim", "embed_dim", "norm", "positions")}
    rows = torch.linspace(0, cfg.vocab_size - 1, 32).long().to(model.device)
    shard = model.vocab_shard
    if shard is None:
        norms = weight_rows(model.output.weight, rows).float().norm(dim=-1)  # [32]
    else:  # tensor parallel: each rank's norms of the rows it holds, summed over the ranks
        local = rows - shard.start
        mine = (local >= 0) & (local < shard.rows)
        norms = weight_rows(model.output.weight, local.clamp(0, shard.rows - 1)).float().norm(dim=-1)
        norms = all_reduce(torch.where(mine, norms, 0.0), shard.group)
    return {"config_sha256": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest(),
            "head_norms": [round(x, 6) for x in norms.tolist()]}


def check_fingerprint(path: Path, meta: dict, model: Transformer) -> None:
    if "config_sha256" not in meta:  # a file from elsewhere (e.g. the ACD paper's released heads): shapes only
        return
    mine = fingerprint(model)
    try:
        theirs = json.loads(meta.get("head_norms", "[]"))
    except (ValueError, RecursionError):
        theirs = []
    theirs = theirs if isinstance(theirs, list) and all(isinstance(x, int | float) for x in theirs) else []
    same_head = len(theirs) == len(mine["head_norms"]) and all(
        abs(a - b) <= 1e-2 * max(abs(a), 1e-6) for a, b in zip(theirs, mine["head_norms"]))
    if meta["config_sha256"] != mine["config_sha256"] or not same_head:
        raise LcdError(f"{path}: fitted on another model ({meta.get('model', 'unknown')}), not this one "
                       f"({model.config.family}, {model.config.n_layers} layers)")


@dataclass
class ExitHeads:
    """A loaded --exit-heads file: per layer a lens (weight [C, C], bias [C]) or a trained head [V, E]."""

    path: Path
    kind: str  # "lens" | "heads"
    lens: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    heads: dict[int, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.lens or self.heads)

    def auto_layer(self, n_layers: int) -> int | None:
        """auto_layer's choice among the file's layers, from the statistics it records (None if it has none)."""
        try:
            stats = {int(k): v for k, v in json.loads(self.meta.get("layer_stats", "{}")).items()
                     if isinstance(v, dict) and isinstance(v.get("top1"), int | float)}
        except (ValueError, RecursionError, AttributeError):  # not JSON, not an object, a key not a layer
            return None
        stats = {j: s for j, s in stats.items() if j in self.layers or j == n_layers}
        if n_layers not in stats or not any(j < n_layers for j in stats):
            return None
        return auto_layer(stats, n_layers)


def save_exit_heads(path: str | Path, model: Transformer, kind: str, tensors: dict[str, Tensor], info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kind": kind, "model": f"{model.config.family} {model.config.n_layers} layers",
            **{k: str(v) if isinstance(v, str | int | float) else json.dumps(v)
               for k, v in {**fingerprint(model), **info}.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_exit_heads(path: str | Path, model: Transformer) -> ExitHeads:
    """Read a lens file (`lens.<l>.weight` [C, C], `lens.<l>.bias` [C]) or trained heads (`...lm_head_<l>.weight`
    [V, E]) for `model`: shapes, values and the model it was made for are checked, each with a one-line error."""
    path = Path(path)
    cfg = model.config
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names if re.search(r"(lens\.\d{1,6}\.(weight|bias)|lm_head_"
                                                                      r"\d{1,6}\.weight)$", k)}
    except (SafetensorError, OSError) as e:
        raise LcdError(f"{path}: cannot read exit heads ({e})") from None
    check_fingerprint(path, meta, model)
    out = ExitHeads(path, "lens" if any(k.startswith("lens.") for k in tensors) else "heads", meta=meta)
    for key, tensor in sorted(tensors.items()):
        m = re.search(r"(\d+)\.(weight|bias)$", key)
        layer, part = int(m.group(1)), m.group(2)
        if not 0 <= layer <= cfg.n_layers:
            raise LcdError(f"{path}: '{key}' is for layer {layer}, the model has layers 0..{cfg.n_layers}")
        lens = key.startswith("lens.")
        if lens != (out.kind == "lens"):
            raise LcdError(f"{path}: '{key}' mixes trained heads and lens translators in one file")
        want = (cfg.vocab_size, cfg.embed_dim) if not lens else (cfg.dim, cfg.dim) if part == "weight" else (cfg.dim,)
        if tuple(tensor.shape) != want:
            raise LcdError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, expected {want}")
        if not tensor.is_floating_point():
            raise LcdError(f"{path}: '{key}' has dtype {tensor.dtype}, expected floating point")
        tensor = tensor.to(dtype=model.dtype, device=model.device).contiguous()
        if not finite(tensor):
            raise LcdError(f"{path}: '{key}' holds NaN or infinite values (as {model.dtype})")
        if not lens:
            out.heads[layer] = tensor
        elif part == "weight":
            out.lens[layer] = (tensor, out.lens.get(layer, (None, None))[1])
        else:
            out.lens[layer] = (out.lens.get(layer, (None, None))[0], tensor)
    if not out.heads and not out.lens:
        raise LcdError(f"{path}: no tensors named 'lm_head_<layer>.weight' or 'lens.<layer>.weight'")
    for layer, (weight, bias) in out.lens.items():
        if weight is None or bias is None:
            raise LcdError(f"{path}: layer {layer}'s lens lacks its {'weight' if weight is None else 'bias'}")
    return out


# ---- fitting lenses --------------------------------------------------------------------------------------------

def lstsq_translators(xtx: Tensor, xty: Tensor) -> tuple[Tensor, Tensor]:
    """The least-squares affine map from normal equations: xtx [L, C+1, C+1] = sum [x;1][x;1]^T, xty [L, C+1, C]
    = sum [x;1] y^T (float64) -> weight [L, C, C] (y = weight x + bias), bias [L, C]. Minimum-norm where the data
    leave a direction undetermined (SVD-based solve), as numpy's lstsq on the raw rows."""
    solution = torch.linalg.lstsq(xtx, xty, driver="gelsd", rcond=1e-12).solution  # [L, C+1, C]
    return solution[:, :-1].transpose(1, 2).contiguous(), solution[:, -1].contiguous()


def readout_logits(model: Transformer, h: Tensor, lens: tuple[Tensor, Tensor] | None = None,
                   head: Tensor | None = None) -> Tensor:
    """What layer l predicts from residual streams h [..., C]: lens, final norm, head -> logits [..., V]."""
    if lens is not None:
        h = F.linear(h, lens[0].to(h.device, h.dtype), lens[1].to(h.device, h.dtype))
    h = model.final_hidden(h.to(model.dtype))
    return (model.logits(h) if head is None else softcapped(F.linear(h, head), model.config.final_softcap)).float()


def layer_stats(model: Transformer, dev_h: Tensor, dev_logits: Tensor, targets: Tensor, layers: tuple[int, ...],
                lenses: dict[int, tuple[Tensor, Tensor]] | None) -> dict[int, dict]:
    """Per layer on held-out tokens: KL(p_N || p_l) (nats), top-1 agreement with the final layer, and the
    cross-entropy of the next token, read through the lens (or the shared head when `lenses` is None)."""
    final_logp = dev_logits.log_softmax(-1)
    out = {}
    for i, layer in enumerate(layers):
        logp = readout_logits(model, dev_h[i], None if lenses is None else lenses[layer]).log_softmax(-1)
        kl = (final_logp.exp() * (final_logp - logp)).sum(-1).mean().item()
        top1 = (logp.argmax(-1) == final_logp.argmax(-1)).float().mean().item()
        ce = -logp.gather(-1, targets[:, None]).mean().item()
        out[layer] = {"kl": round(kl, 4), "top1": round(top1, 4), "ce": round(ce, 4)}
    return out


def auto_layer(stats: dict[int, dict], n_layers: int) -> int:
    """The automatic amateur: the lowest layer below N whose readout's top token agrees with the final layer's on
    at least AUTO_AGREEMENT of the held-out tokens, else the highest layer below N. Such an amateur shares the
    expert's fluency, so the contrast acts where the two disagree rather than adding a weak layer's noise
    (on SmolLM2 the dev sweep in the README). Deterministic: a function of the statistics alone."""
    below = sorted(layer for layer in stats if layer < n_layers)
    return next((layer for layer in below if stats[layer]["top1"] >= AUTO_AGREEMENT), below[-1])


def parse_layers(spec: str, n_layers: int, allow_final: bool) -> tuple[int, ...]:
    top = n_layers if allow_final else n_layers - 1
    if spec == "all":
        return tuple(range(top + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise LcdError(f"--layers: '{spec}' is not 'all' or a comma-separated list of layers") from None
    bad = [j for j in layers if not 0 <= j <= top]
    if not layers or bad:
        raise LcdError(f"--layers: {bad[0] if bad else spec!r} outside 0..{top}")
    return tuple(layers)


def fit_lens(engine, data: list[str | Path], layers: tuple[int, ...], max_tokens: int = 200_000,
             refine_steps: int = 0, tokens_per_batch: int = 2048, progress: bool = True) -> dict:
    """Fit one lens per layer on the data's tokens (the last DEV_TOKENS held out for the statistics) and, when
    `refine_steps`, refine them by the tuned-lens objective. Returns tensors, statistics and the fit's facts."""
    model, t0 = engine.model, time.perf_counter()
    n, C = model.config.n_layers, model.config.dim
    fit_rows, dev = split_dev(token_rows(engine.tokenizer, read_texts(data), max_tokens + DEV_TOKENS,
                                         row_length(model)))
    wanted = tuple(sorted(set(layers) | {n}))  # h[N] is the target
    xtx = torch.zeros(len(wanted), C + 1, C + 1, dtype=torch.float64)
    xty = torch.zeros(len(wanted), C + 1, C, dtype=torch.float64)
    with progress_bar(progress) as bar:
        task = bar.add_task("fitting lenses", total=fit_rows.numel())
        for batch in batches(fit_rows, tokens_per_batch):
            with torch.inference_mode():
                h, _ = hidden_states(model, batch, wanted)
            h = h.reshape(len(wanted), -1, C).double().cpu()  # [L, M, C]
            x = torch.cat([h, torch.ones(*h.shape[:2], 1, dtype=torch.float64)], dim=-1)  # [L, M, C+1]
            xtx += x.transpose(1, 2) @ x
            xty += x.transpose(1, 2) @ h[-1]
            bar.advance(task, batch.numel())
    weight, bias = lstsq_translators(xtx, xty)
    device = model.device
    lenses = {layer: (weight[i].float().to(device), bias[i].float().to(device)) for i, layer in enumerate(wanted)}
    fit_seconds = time.perf_counter() - t0
    if refine_steps:
        lenses = refine_lenses(model, fit_rows, lenses, layers, refine_steps, progress=progress)
    info = {"objective": "lstsq" + (f"+kl:{refine_steps}" if refine_steps else ""), "tokens": fit_rows.numel(),
            "layers": list(layers), "data": [Path(p).name for p in data], "fit_seconds": round(fit_seconds, 1)}
    if len(dev):
        with torch.inference_mode():
            info.update(dev_statistics(model, dev, wanted, lenses))
    lenses = {layer: pair for layer, pair in lenses.items() if layer in layers}
    tensors = {f"lens.{layer}.{part}": t for layer, pair in lenses.items() for part, t in zip(("weight", "bias"), pair)}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return {"tensors": tensors, "info": info}


def dev_statistics(model: Transformer, dev: Tensor, layers: tuple[int, ...],
                   lenses: dict[int, tuple[Tensor, Tensor]] | None) -> dict:
    """Per-layer statistics through the lens and through the shared head, and each one's automatic layer."""
    n = model.config.n_layers
    h, logits = hidden_states(model, dev[:, :-1], layers, logits=True)
    C = h.shape[-1]
    h, logits, targets = h.reshape(len(layers), -1, C), logits.reshape(-1, logits.shape[-1]), dev[:, 1:].reshape(-1)
    info = {"dev_tokens": targets.numel()}
    has_amateur = any(j < n for j in layers)
    if lenses is not None:
        info["layer_stats"] = layer_stats(model, h, logits, targets.to(logits.device), layers, lenses)
        if has_amateur:
            info["auto_layer"] = auto_layer(info["layer_stats"], n)
    info["shared_head_stats"] = layer_stats(model, h, logits, targets.to(logits.device), layers, None)
    if has_amateur:
        info["shared_head_auto_layer"] = auto_layer(info["shared_head_stats"], n)
    return info


def refine_lenses(model: Transformer, rows: Tensor, lenses: dict[int, tuple[Tensor, Tensor]], layers: tuple[int, ...],
                  steps: int, tokens_per_step: int = 256, lr: float = 1e-3, progress: bool = True) -> dict:
    """The tuned-lens objective from the least-squares start: Adam on KL(p_N || p_lens) over `steps` batches."""
    n = model.config.n_layers
    train = [j for j in layers if j != n]
    params = {j: [lenses[j][0].clone().requires_grad_(), lenses[j][1].clone().requires_grad_()] for j in train}
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    flat = rows.reshape(-1)
    per_row = min(rows.shape[1], tokens_per_step)
    with progress_bar(progress) as bar:
        task = bar.add_task("refining lenses (KL)", total=steps)
        for step in range(steps):
            start = (step * tokens_per_step) % max(1, flat.numel() - per_row)
            batch = flat[start:start + tokens_per_step].view(-1, per_row)
            with torch.inference_mode():
                h, final = hidden_states(model, batch, tuple(train), logits=True)
            h, target = h.clone(), final.log_softmax(-1).clone()
            with torch.enable_grad():
                opt.zero_grad()
                loss = sum(F.kl_div(readout_logits(model, h[i], params[j]).log_softmax(-1), target,
                                    log_target=True, reduction="batchmean") for i, j in enumerate(train))
                loss.backward()
                opt.step()
            bar.advance(task)
    return {**lenses, **{j: (w.detach(), b.detach()) for j, (w, b) in params.items()}}


# ---- training exit heads ---------------------------------------------------------------------------------------

def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def train_heads(engine, data: list[str | Path], layers: tuple[int, ...], out: str | Path, max_tokens: int = 100_000,
                steps: int | None = None, tokens_per_step: int = 2048, lr: float = 1e-4, save_every: int = 50,
                progress: bool = True) -> dict:
    """Train a [V, E] head per layer after the final norm (from the model's head), the model frozen: AdamW on
    next-token cross-entropy, batches in a fixed order. Resumes from `out`'s state file (written every
    `save_every` steps) when it holds the same run; a resumed run equals an uninterrupted one."""
    model, out = engine.model, Path(out)
    t0 = time.perf_counter()
    rows = token_rows(engine.tokenizer, read_texts(data), max_tokens, seq_len=min(row_length(model), tokens_per_step))
    plan = batches(rows, tokens_per_step)
    steps = len(plan) if steps is None else steps
    run = {"layers": list(layers), "tokens": rows.numel(), "tokens_per_step": tokens_per_step, "lr": lr,
           "data": [Path(p).name for p in data],
           "data_sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest()}  # what a resumed run shares
    head = dense(model.output.weight, model.dtype).detach()
    weights = {j: head.float().clone().requires_grad_() for j in layers}
    opt = torch.optim.AdamW(list(weights.values()), lr=lr, weight_decay=0.0)
    start, losses = resume(state_path(out), run, weights, opt, model, steps)
    with progress_bar(progress) as bar:
        task = bar.add_task("training exit heads", total=steps, completed=start)
        for step in range(start, steps):
            batch = plan[step % len(plan)]
            with torch.inference_mode():
                h, _ = hidden_states(model, batch, layers)
                normed = model.final_hidden(h.to(head.dtype)).float()[:, :, :-1]  # [L, R, T-1, E]
            normed, targets = normed.clone(), batch[:, 1:].reshape(-1).to(head.device)
            with torch.enable_grad():
                opt.zero_grad()
                cap = model.config.final_softcap  # trained through the soft-capping decoding applies
                loss = sum(F.cross_entropy(softcapped(normed[i].reshape(-1, normed.shape[-1]) @ weights[j].t(), cap),
                                           targets) for i, j in enumerate(layers)) / len(layers)
                loss.backward()
                opt.step()
            losses.append(round(loss.item(), 5))
            bar.advance(task)
            if (step + 1) % save_every == 0 or step + 1 == steps:
                save_state(state_path(out), run, weights, opt, step + 1, losses, model)
    seconds = time.perf_counter() - t0
    info = {**run, "steps": steps, "objective": "next-token cross-entropy", "losses": losses,
            "seconds": round(seconds, 1)}
    save_exit_heads(out, model, "heads", {f"lm_head_{j}.weight": w for j, w in weights.items()}, info)
    return info


def save_state(path: Path, run: dict, weights: dict[int, Tensor], opt: torch.optim.Optimizer, step: int,
               losses: list[float], model: Transformer) -> None:
    tensors = {f"lm_head_{j}.weight": w for j, w in weights.items()}
    for j, w in weights.items():
        state = opt.state.get(w, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                tensors[f"opt.{j}.{name}"] = state[name]
    save_exit_heads(path, model, "train-state", tensors, {"run": run, "step": step, "losses": losses})


def resume(path: Path, run: dict, weights: dict[int, Tensor], opt: torch.optim.Optimizer, model: Transformer,
           steps: int) -> tuple[int, list[float]]:
    """The step to start from (0 unless `path` holds this run's state) and the losses so far."""
    if not path.is_file():
        return 0, []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            same = json.loads(meta.get("run", "{}")) == json.loads(json.dumps(run))
            if not same:
                raise LcdError(f"{path}: holds another training run (different layers, data or settings); "
                               "delete it or choose another --out")
            check_fingerprint(path, meta, model)
            step = int(meta["step"])
            if step > steps:
                raise LcdError(f"{path}: holds a run already trained for {step} steps, more than --steps {steps}")
            with torch.no_grad():
                for j, w in weights.items():
                    w.copy_(f.get_tensor(f"lm_head_{j}.weight"))
            for j, w in weights.items():
                opt.state[w] = {"step": torch.tensor(float(step)),
                                "exp_avg": f.get_tensor(f"opt.{j}.exp_avg").to(w.device),
                                "exp_avg_sq": f.get_tensor(f"opt.{j}.exp_avg_sq").to(w.device)}
            return step, json.loads(meta.get("losses", "[]"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise LcdError(f"{path}: cannot resume from this training state ({e})") from None


def seconds_per_100k(info: dict) -> float:
    """Training time per 100k tokens per layer of a train_heads run."""
    tokens = info["steps"] * info["tokens_per_step"]
    return info["seconds"] / max(1, tokens) * 100_000 / len(info["layers"]) if tokens else math.nan


# The dev text `amateur_layer="auto"` measures the shared head on when no exit heads' file says (an original
# paragraph of plain encyclopedic English, so no dataset is needed at run time).
DEV_TEXT = (
    "The river rises in the hills north of the town and runs south for about forty miles before it reaches the "
    "sea. For most of its length it is slow and shallow, and in dry summers parts of it can be crossed on foot. "
    "The first bridge was built of wood in the twelfth century by the monks of a nearby abbey, who charged a small "
    "toll to pay for its repair. It was replaced in stone three hundred years later, after a flood carried the old "
    "one away together with several houses on the bank. The town grew up around the bridge. Its market, held every "
    "Thursday since the fourteenth century, drew farmers from the surrounding villages, who sold wool, grain and "
    "cattle, and bought salt, iron tools and cloth brought up the river by boat. In the eighteenth century a canal "
    "was cut to link the river with the coal fields to the east, and for a few decades the town prospered as a "
    "port. The arrival of the railway in 1841 ended that trade within a generation: goods that had taken a week to "
    "reach the coast by water now took a day. Today the canal is used by pleasure boats, the old warehouses have "
    "been turned into flats and a museum, and the market still meets on Thursdays in the square beside the church. "
    "The population, which fell by a third between 1880 and 1930, has grown again since the 1960s, when a new road "
    "made it possible to live in the town and work in the city. Most people now travel to work by car or by train, "
    "and the river, once the reason the town existed, is mainly a place to walk on a Sunday afternoon.")


def shared_head_auto_layer(engine) -> int:
    """auto_layer for the model's own head, measured once on DEV_TEXT and kept in $LCDFAST_HOME/auto_layer.json
    (by the model's fingerprint)."""
    from .convert import lcdfast_home

    model = engine.model
    key = fingerprint(model)["config_sha256"] + ":" + json.dumps(fingerprint(model)["head_norms"][:4])
    path = lcdfast_home() / "auto_layer.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        ids = engine.tokenizer.encode(DEV_TEXT)
        rows = torch.tensor(ids[: min(len(ids), engine.max_seq_len)])[None]
        with torch.inference_mode():
            info = dev_statistics(model, rows, tuple(range(model.config.n_layers + 1)), None)
        known[key] = info["shared_head_auto_layer"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known))
        except OSError:  # a read-only home: measured again next time
            pass
    return int(known[key])
