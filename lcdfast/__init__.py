"""lcdfast: fast layer-contrastive decoding (ACD, DoLa, CD) for GPT-2, LLaMA and OPT checkpoints."""

from .api import Engine, load
from .errors import LcdError
from .generate import DecodeConfig, Generation

__all__ = ["DecodeConfig", "Engine", "Generation", "LcdError", "load"]
__version__ = "0.1.0"
