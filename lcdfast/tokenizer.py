"""Text <-> ids for a checkpoint directory: tokenizer.json (HF `tokenizers`) or tokenizer.model (sentencepiece).

Matches transformers' AutoTokenizer on the same directory: special tokens in the text are matched as
single ids, BOS/EOS follow tokenizer_config's add_bos_token/add_eos_token when given (else the
tokenizer.json post-processor decides), and the chat template is rendered in a jinja2 sandbox (here also bounded in
time and size). A malformed file or value is an LcdError naming the file and key.
"""

import json
import os
import re
import sys
import time
from datetime import datetime
from functools import cached_property, wraps
from pathlib import Path

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LcdError, is_int, shown, token_ids

TEMPLATE_SECONDS = 2.0  # a chat template renders in milliseconds; one still running after this is looping
TEMPLATE_CHARS = 1_000_000  # longest rendered prompt, and longest string or list a template may build with * or **


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, invalid UTF-8, an integer of 5000 digits
        raise LcdError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LcdError(f"{path}: holds a {type(data).__name__}, expected a JSON object")
    return data


def _content(token, where: str) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts {"content": ...}."""
    content = token.get("content") if isinstance(token, dict) else token
    if content is not None and not isinstance(content, str):
        raise LcdError(f"{where} {token!r} must be a string, an object with a string 'content', or null")
    if content is not None and not content.isascii():
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a JSON escape such as "\ud800": no tokenizer takes it
            raise LcdError(f"{where} {token!r} is not valid Unicode (a lone surrogate)") from None
    return content


def _flag(cfg: dict, key: str, default: bool | None, where: Path) -> bool | None:
    value = cfg.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise LcdError(f"{where}: {key} {value!r} must be true, false or null")
    return value


def _chat_template(model_dir: Path, cfg: dict) -> tuple[str | None, str]:
    """The chat template and where it came from (file and key, for errors): tokenizer_config.json's
    chat_template (a string, or transformers' list of {"name", "template"}: the one named "default"), else
    chat_template.jinja, else chat_template.json."""
    where = f"{model_dir / 'tokenizer_config.json'}: chat_template"
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {}
        for i, t in enumerate(template):
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise LcdError(f"{where}[{i}]: {str(t)[:80]} must be an object with string 'name' and 'template'")
            named[t["name"]] = t["template"]
        if "default" not in named:
            raise LcdError(f"{where}: no template named 'default' among {sorted(named)}")
        template, where = named["default"], f"{where}[default]"
    if template is None and (model_dir / "chat_template.jinja").is_file():
        where = str(model_dir / "chat_template.jinja")
        try:
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LcdError(f"{where}: not valid UTF-8 ({e})") from None
    if template is None:
        where = f"{model_dir / 'chat_template.json'}: chat_template"
        template = _json(model_dir / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, str):
        raise LcdError(f"{where}: {str(template)[:80]} must be a string")
    return template or None, where


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox, where no one operation can build a string or list over TEMPLATE_CHARS
    (jinja2 already caps range() at MAX_RANGE items), and _bounded stops one that grows memory step by step."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and is_int(left) and is_int(right) and abs(left) > 1 and right > 4096:
            raise SecurityError(f"{left} ** {right} is too large")
        if operator == "*":
            seq, n = (left, right) if isinstance(left, str | list | tuple) else (right, left)
            if isinstance(seq, str | list | tuple) and is_int(n):
                _fits("*", _size(seq) * n)
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _fits("+", _size(left) + _size(right))
        if operator == "%" and isinstance(left, str):
            _check_format("%", left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        receiver = getattr(method, "__self__", None)
        name = getattr(method, "__name__", "call")
        if isinstance(receiver, str):
            args = _checked(name, (receiver, *args), kwargs)[1:]
        else:
            args = _checked(name, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


MAX_ARGUMENT = 100_000  # the largest width or count a template may pass a padding call (= jinja2's MAX_RANGE)
PADDING = {"ljust", "rjust", "center", "zfill", "expandtabs", "do_center", "do_indent", "do_wordwrap",
           "generate_lorem_ipsum"}  # calls and filters whose integer arguments are sizes of what they build
FORMATS = {"format", "format_map", "do_format"}
# in a format string: a %-width of 6+ digits or '*', a {:width} of 6+ digits or a nested {field} as the width
WIDE_SPEC = re.compile(r"%[-+ #0]*(\*|\d{6,})|\{[^{}]*:[^{}]*(\{|\d{6,})")
TEMPLATE_MEMORY = 256 << 20  # bytes a template may add to the process's memory (checked on each line it runs)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _size(value) -> int:
    """A string's characters; a list's items plus the characters of its string items (a list of references to
    one long string costs what printing it does)."""
    if isinstance(value, str):
        return len(value)
    return len(value) + sum(len(x) for x in value if isinstance(x, str | list | tuple))


def _fits(name: str, length: int) -> None:
    if length > TEMPLATE_CHARS:
        raise SecurityError(f"{name} would build {length} items or characters (at most {TEMPLATE_CHARS})")


def _check_format(name: str, format_string: str) -> None:
    if WIDE_SPEC.search(format_string):
        raise SecurityError(f"{name}: a format width in {shown(format_string)} is over {MAX_ARGUMENT} or not literal")


def _checked(name: str, args: tuple, kwargs: dict) -> tuple:
    """`args` of a call or filter named `name`, or a SecurityError if its result could be over TEMPLATE_CHARS: a
    padding call's integer argument over MAX_ARGUMENT (or indent's string of a width, wordwrap's separator, too
    long for the text), a format string's width (WIDE_SPEC), a join or a replace whose result would be too long.
    A join's items come back as a list (a generator is read once, here)."""
    strings = [i for i, v in enumerate(args) if isinstance(v, str)]
    if name in PADDING:
        if any(is_int(v) and abs(v) > MAX_ARGUMENT for v in (*args, *kwargs.values())):
            raise SecurityError(f"{name}: an argument is over {MAX_ARGUMENT}")
        text = args[strings[0]] if strings else ""
        if name == "do_indent":  # do_indent(s, width, ...): a string width is copied once per line
            width = kwargs.get("width", args[1] if len(args) > 1 else 4)
            if isinstance(width, str):
                _fits(name, len(text) + len(width) * (text.count("\n") + 1))
        if name == "do_wordwrap":  # do_wordwrap(environment, s, width, break_long_words, wrapstring, ...)
            wrap = kwargs.get("wrapstring", args[4] if len(args) > 4 else None)
            if isinstance(wrap, str):  # at worst a break after every character
                _fits(name, len(text) + len(wrap) * (len(text) + 1))
    if name in FORMATS and strings:
        _check_format(name, args[strings[0]])
    if name in ("join", "do_join") and len(args) >= 2:  # str.join(sep, items); the filter: join(items, sep)
        sep, at = (args[0], 1) if name == "join" else (kwargs.get("d", args[2] if len(args) > 2 else ""), 1)
        items = list(args[at])
        _fits(name, sum(map(len, map(str, items))) + len(str(sep)) * max(len(items) - 1, 0))  # C loops: untraced
        args = (*args[:at], items, *args[at + 1:])
    elif name in ("replace", "do_replace") and len(strings) >= 3:  # s, old, new (after the filter's context)
        text, old, new = (args[i] for i in strings[:3])
        _fits(name, len(text) + (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0))
    return args


def _guarded_filter(fn):
    """A jinja2 filter behind _checked (its pass_context/pass_eval_context marking kept by wraps)."""

    @wraps(fn)
    def filter_(*args, **kwargs):
        return fn(*_checked(fn.__name__, args, kwargs), **kwargs)

    return filter_


class TooSlow(Exception):
    """A chat template still running after TEMPLATE_SECONDS, or past TEMPLATE_MEMORY."""


def _memory_reader() -> tuple:
    """(a function returning the process's resident memory in bytes, one closing what it reads): now, from Linux's
    /proc through one open descriptor (about a microsecond), else its peak (the resource module), else 0."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        return (lambda: int(os.pread(fd, 64, 0).split()[1]) * PAGE), lambda: os.close(fd)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return (lambda: 0), lambda: None
    unit = 1 if sys.platform == "darwin" else 1024
    return (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit), lambda: None


def _bounded(fn, *args, **kwargs):
    """fn(*args, **kwargs), stopped with TooSlow after TEMPLATE_SECONDS or once it has grown the process's
    memory by TEMPLATE_MEMORY: a trace function checks on each line of Python it runs (jinja2 compiles templates
    to Python, so a template's loops are lines too)."""
    memory, close = _memory_reader()
    deadline, most = time.monotonic() + TEMPLATE_SECONDS, memory() + TEMPLATE_MEMORY

    def tick(frame, event, arg):
        if time.monotonic() > deadline:
            raise TooSlow(f"still running after {TEMPLATE_SECONDS:g}s")
        if event == "line" and memory() > most:
            raise TooSlow(f"grew memory by over {TEMPLATE_MEMORY >> 20} MiB")
        return tick

    previous = sys.gettrace()
    sys.settrace(tick)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.settrace(previous)
        close()


class Tokenizer:
    def __init__(self, model_dir: Path, hf=None, sp=None) -> None:
        self.model_dir, self.hf, self.sp = model_dir, hf, sp
        path = model_dir / "tokenizer_config.json"
        self.cfg = cfg = _json(path)
        model_cfg = _json(model_dir / "config.json")
        gen_cfg = _json(model_dir / "generation_config.json")
        # Special tokens: defaults of transformers' LlamaTokenizer for sentencepiece, none for tokenizer.json.
        default = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"} if sp is not None else {}
        self.tokens = {k: _content(cfg.get(f"{k}_token", default.get(k)), f"{path}: {k}_token")
                       for k in ("bos", "eos", "pad", "unk")}
        # sentencepiece only (tokenizer.json has its own): token text -> id, matched whole inside the input text
        added = cfg.get("added_tokens_decoder", {}) if sp is not None else {}
        if not isinstance(added, dict):
            raise LcdError(f"{path}: added_tokens_decoder must be an object of id: {{\"content\": ...}}")
        self.specials: dict[str, int] = {}
        for k, a in added.items():
            content = _content(a, f"{path}: added_tokens_decoder[{k!r}]")
            if not k.isdecimal() or content is None:
                raise LcdError(f"{path}: added_tokens_decoder[{k!r}] must map a token id to {{\"content\": ...}}")
            self.specials[content] = int(k)
        ids = {k: self._token_id(t) for k, t in self.tokens.items()}
        model_ids = {k: token_ids(f"{model_dir / 'config.json'}: {k}", model_cfg.get(k))[:1] or [None]
                     for k in ("bos_token_id", "pad_token_id")}
        self.bos_token_id: int | None = ids["bos"] if ids["bos"] is not None else model_ids["bos_token_id"][0]
        self.pad_token_id: int | None = ids["pad"] if ids["pad"] is not None else model_ids["pad_token_id"][0]
        self.eos_token_id = ids["eos"]  # the tokenizer's own EOS, appended when add_eos_token
        source = "generation_config.json" if "eos_token_id" in gen_cfg else "config.json"
        eos = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id"))
        eos = token_ids(f"{model_dir / source}: eos_token_id", eos)
        if self.eos_token_id is not None and self.eos_token_id not in eos:
            eos.append(self.eos_token_id)
        self.eos_token_ids: list[int] = eos
        # None: leave BOS/EOS to tokenizer.json's post-processor; sentencepiece defaults are LLaMA's.
        self.add_bos: bool | None = _flag(cfg, "add_bos_token", True if sp is not None else None, path)
        self.add_eos: bool | None = _flag(cfg, "add_eos_token", False if sp is not None else None, path)
        self.cleanup = bool(_flag(cfg, "clean_up_tokenization_spaces", False, path))
        self.special_ids = set(self.specials.values())
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
        n = hf.get_vocab_size(with_added_tokens=True) if hf is not None else sp.get_piece_size()
        if n == 0:
            raise LcdError(f"{model_dir / ('tokenizer.json' if sp is None else 'tokenizer.model')}: empty vocabulary")
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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: argv bytes that were not UTF-8, or a broken str
            raise LcdError(f"text: {text[:40]!r} is not valid Unicode (lone surrogates; not UTF-8 bytes?)") from None
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

    @cached_property
    def chat_template(self) -> tuple:
        """The chat template compiled in a jinja2 sandbox as transformers does (None: the model has none), and the
        file and key it came from; read when first used, so a model with a broken template still takes plain
        prompts."""
        source, where = _chat_template(self.model_dir, self.cfg)
        if source is None:
            return None, where

        def raise_exception(message: str):
            raise LcdError(f"{where}: {message}")

        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.filters = {name: _guarded_filter(fn) for name, fn in env.filters.items()}
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        return self._run_template(where, env.from_string, source), where

    def _run_template(self, where: str, fn, *args, **kwargs):
        """fn(*args, **kwargs) bounded in time (_bounded), anything it raises an LcdError naming the template."""
        try:
            return _bounded(fn, *args, **kwargs)
        except LcdError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a template raises (1/0 too) is the template's fault
            message = " ".join(str(e).split())[:200]
            raise LcdError(f"{where}: the chat template failed ({type(e).__name__}: {message})") from None

    def apply_chat_template(self, messages: str | list[dict[str, str]]) -> str:
        """The prompt for a conversation ({"role", "content"} dicts; a string: one user turn) followed by the
        assistant's generation prompt (LcdError naming the template's file if it fails, runs over
        TEMPLATE_SECONDS, or renders nothing or over TEMPLATE_CHARS)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        template, where = self.chat_template
        if template is None:
            raise LcdError(f"{self.model_dir}: no chat_template in tokenizer_config.json (use a plain prompt)")
        tokens = {f"{k}_token": v for k, v in self.tokens.items() if v is not None}
        text = self._run_template(where, template.render, messages=messages,
                             add_generation_prompt=True, **tokens)
        if not text:
            raise LcdError(f"{where}: the chat template rendered an empty prompt")
        if len(text) > TEMPLATE_CHARS:
            raise LcdError(f"{where}: the chat template rendered {len(text)} characters (at most {TEMPLATE_CHARS})")
        return text


def releasable(text: str, stops: list[str]) -> tuple[int, bool]:
    """How much of streamed `text` (not yet shown) is final, as generate cuts its text at the first stop string:
    all up to the first stop string if one came (True), else all but the longest tail that may begin one."""
    found = [text.find(s) for s in stops if s in text]
    if found:
        return min(found), True
    return len(text) - max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0), False


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
