"""lcdfast: fast layer-contrastive decoding (ACD, DoLa, CD) for GPT-2, LLaMA and OPT checkpoints."""

import importlib

from .errors import LcdError

__all__ = ["DecodeConfig", "Engine", "Generation", "LcdError", "load"]
__version__ = "0.1.0"
_FROM = {"Engine": "api", "load": "api", "DecodeConfig": "generate", "Generation": "generate"}


def __getattr__(name: str):
    """The names above and the submodules (lcdfast.kernels, ...) import on first use, torch with them: the
    `lcdfast` command parses its arguments first and answers Ctrl-C during that import with one line."""
    try:
        module = importlib.import_module(f"{__name__}.{_FROM.get(name, name)}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_FROM.get(name, name)}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(module, name) if name in _FROM else module
