"""Text <-> ids for a checkpoint directory: tokenizer.json (HF `tokenizers`) or tokenizer.model (sentencepiece).

Matches transformers' AutoTokenizer on the same directory: special tokens in the text are matched as
single ids, BOS/EOS follow tokenizer_config's add_bos_token/add_eos_token when given (else the
tokenizer.json post-processor decides), and the chat template is rendered in a jinja2 sandbox.
"""

import json
import re
from datetime import datetime
from pathlib import Path

from .errors import LcdError, token_ids


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LcdError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _content(token) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(model_dir: Path, cfg: dict) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template or _json(model_dir / "chat_template.json").get("chat_template")


class Tokenizer:
    def __init__(self, model_dir: Path, hf=None, sp=None) -> None:
        self.model_dir, self.hf, self.sp = model_dir, hf, sp
        cfg = _json(model_dir / "tokenizer_config.json")
        model_cfg = _json(model_dir / "config.json")
        gen_cfg = _json(model_dir / "generation_config.json")
        self.chat_template = _chat_template(model_dir, cfg)
        # Special tokens: defaults of transformers' LlamaTokenizer for sentencepiece, none for tokenizer.json.
        default = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"} if sp is not None else {}
        self.tokens = {k: _content(cfg.get(f"{k}_token", default.get(k))) for k in ("bos", "eos", "pad", "unk")}
        # sentencepiece only (tokenizer.json has its own): token text -> id, matched whole inside the input text
        added = cfg.get("added_tokens_decoder", {}) if sp is not None else {}
        self.specials: dict[str, int] = {a["content"]: int(k) for k, a in added.items()}
        ids = {k: self._token_id(t) for k, t in self.tokens.items()}
        self.bos_token_id: int | None = ids["bos"] if ids["bos"] is not None else model_cfg.get("bos_token_id")
        self.pad_token_id: int | None = ids["pad"] if ids["pad"] is not None else model_cfg.get("pad_token_id")
        self.eos_token_id = ids["eos"]  # the tokenizer's own EOS, appended when add_eos_token
        source = "generation_config.json" if "eos_token_id" in gen_cfg else "config.json"
        eos = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id"))
        eos = token_ids(f"{model_dir / source}: eos_token_id", eos)
        if self.eos_token_id is not None and self.eos_token_id not in eos:
            eos.append(self.eos_token_id)
        self.eos_token_ids: list[int] = eos
        # None: leave BOS/EOS to tokenizer.json's post-processor; sentencepiece defaults are LLaMA's.
        self.add_bos: bool | None = cfg.get("add_bos_token", True if sp is not None else None)
        self.add_eos: bool | None = cfg.get("add_eos_token", False if sp is not None else None)
        self.cleanup = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.special_ids = set(self.specials.values())
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
        n = hf.get_vocab_size(with_added_tokens=True) if hf is not None else sp.get_piece_size()
        self.vocab_size: int = max([n, *(i + 1 for i in self.special_ids)])

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.hf is not None:
            return self.hf.token_to_id(token)
        if token not in self.specials:
            tid = self.sp.piece_to_id(token)
            if self.sp.id_to_piece(tid) != token:  # piece_to_id answers unk for unknown pieces
                return None
            self.specials[token] = tid
        return self.specials[token]

    @staticmethod
    def load(model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                hf = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exception on a bad file
                raise LcdError(f"{path}: cannot load ({e})") from None
            return Tokenizer(model_dir, hf=hf)
        path = model_dir / "tokenizer.model"
        if path.is_file():
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except (OSError, RuntimeError) as e:
                raise LcdError(f"{path}: cannot load ({e})") from None
            return Tokenizer(model_dir, sp=sp)
        raise LcdError(f"{model_dir}: no tokenizer.json or tokenizer.model")

    def special_token_ids(self) -> list[int]:
        """Special and control tokens (tokenizer.json's added tokens marked special, sentencepiece's control and
        unknown pieces and added tokens) with the BOS, EOS and pad ids: the tokens no text is made of."""
        ids = set(self.eos_token_ids) | {i for i in (self.bos_token_id, self.pad_token_id) if i is not None}
        if self.hf is not None:
            ids |= {i for i, token in self.hf.get_added_tokens_decoder().items() if token.special}
        else:
            ids |= self.special_ids | {i for i in range(self.sp.get_piece_size())
                                       if self.sp.is_control(i) or self.sp.is_unknown(i)}
        return sorted(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.hf is not None and (self.add_bos is None or not add_special_tokens):
            return self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if self.hf is not None:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:  # transformers' legacy LlamaTokenizer: sentencepiece on each stretch between special tokens
            ids = []
            for i, chunk in enumerate(self.split.split(text) if self.specials else [text]):
                ids += [self.specials[chunk]] if i % 2 else self.sp.encode(chunk) if chunk else []
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.hf is not None:
            text = self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        elif skip_special_tokens:
            text = self.sp.decode([i for i in ids if i not in self.special_ids])
        else:  # transformers' legacy LlamaTokenizer: a space stands in for each run's dropped dummy prefix
            text, run = "", []
            for k, i in enumerate(ids):
                if i in self.special_ids:
                    space = " " if k and (ids[k - 1] not in self.special_ids) else ""
                    text, run = text + space + self.sp.decode(run) + self.sp.id_to_piece(i), []
                else:
                    run.append(i)
            text += self.sp.decode(run)
        if self.cleanup:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def apply_chat_template(self, user_message: str) -> str:
        """The prompt for one user turn followed by the assistant's generation prompt."""
        if not self.chat_template:
            raise LcdError(f"{self.model_dir}: no chat_template in tokenizer_config.json (use a plain prompt)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise LcdError(f"{self.model_dir}: chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        tokens = {f"{k}_token": v for k, v in self.tokens.items() if v is not None}
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": user_message}], add_generation_prompt=True, **tokens)
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:  # the template's own errors too
            raise LcdError(f"{self.model_dir}: chat template failed to render ({type(e).__name__}: {e})") from None


class StreamDecoder:
    """Incremental detokenizer: push(id) returns the newly completed text, flush() whatever is left.

    Each push re-decodes a short window (the last emitted stretch plus the pending ids) and returns the
    growth, so leading spaces and multi-byte characters split over tokens come out as decode() gives them;
    text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # window start: the first id of the last emitted stretch
        self.done = 0  # ids before this have been emitted

    def _growth(self) -> str:
        decode = self.tokenizer.decode
        return decode(self.ids[self.start:], self.skip)[len(decode(self.ids[self.start:self.done], self.skip)):]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._growth()
        if not new or new.endswith("\ufffd"):
            return ""
        self.start, self.done = self.done, len(self.ids)
        return new

    def flush(self) -> str:
        new = self._growth()
        self.start = self.done = len(self.ids)
        return new
