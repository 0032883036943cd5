"""The optional C++/CUDA ops (csrc/, DESIGN.md §4), built on demand by torch's JIT extension loader.

Off unless LCDFAST_CSRC=1 (built when this module is imported) or `enable()` is called: then csrc/ is compiled
once for this CPU, cached in torch's extensions dir (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), and
- `contrast.amateur_logits_at` calls `torch.ops.lcdfast.masked_logits` (the masked contrast op, §4.3) instead of
  its torch reference; the CUDA kernel is built only with a CUDA torch and nvcc;
- `model.linear` on CPU calls `torch.ops.lcdfast.skinny_linear` for products of up to SKINNY_ROWS rows (decode
  steps, DoLa's stacked exit heads) instead of BLAS or inductor's reduction (compiled single rows stay there), and
  `torch.ops.lcdfast.quant_linear` for those of quantized weights (quant.py), compiled single rows included, or
  `quant_linear_a8` where the weights say their activations are quantized too (`+a8`);
- `contrast.js_divergence` on CPU calls `torch.ops.lcdfast.js_divergence` (DoLa's layer selection in two passes).
Any failure (no compiler, no ninja, a build error) says so in one line on stderr and leaves the torch path in use;
nothing here raises. Building needs ninja (`pip install ninja`, in the dev and csrc extras).
"""

import functools
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).resolve().parent.parent / "csrc"

_enabled = os.environ.get("LCDFAST_CSRC") == "1"
_devices: frozenset[str] | None = None  # device types the loaded op serves; None until a build is tried


def enable() -> bool:
    """Build (once) and use the ops from now on. False, after one line on stderr, if it can't be built."""
    global _enabled
    _enabled = True
    return load()


def load() -> bool:
    """If enabled, build and load the ops, once per process (later builds are cached on disk). Never raises."""
    global _devices
    if _devices is None and _enabled:
        try:
            _devices = _build()
        except Exception as e:  # compiler, ninja or build errors alike: fall back to the reference
            print(f"lcdfast: csrc kernel not built ({type(e).__name__}: {_why(e)}); using the torch reference",
                  file=sys.stderr)
            _devices = frozenset()
    return bool(_devices)


def csrc_on(device: torch.device) -> bool:
    """Whether the built ops should be called for tensors on `device` (skinny_linear: CPU only)."""
    return _enabled and _devices is not None and device.type in _devices


def _why(e: Exception) -> str:
    """A build error's telling line: the compiler's or linker's first "error:", else the first."""
    lines = str(e).strip().splitlines() or [""]
    return next((line for line in lines if "error:" in line), lines[0]).strip()[:200]


def _build() -> frozenset[str]:
    from torch.utils import cpp_extension

    bin_dir = os.path.dirname(sys.executable)  # where `pip install ninja` puts it, even if the venv isn't active
    if shutil.which("ninja") is None and shutil.which("ninja", path=bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    sources = [str(CSRC / name) for name in ("masked_contrast.cpp", "skinny_linear.cpp", "js_divergence.cpp",
                                                   "quant_linear.cpp")]
    # For this CPU (-march=native: skinny_linear's AVX2 path where it has AVX2, FMA and F16C; a cache dir shared
    # with an older CPU needs its own TORCH_EXTENSIONS_DIR); OpenMP for ATen's parallel_for.
    build = functools.partial(cpp_extension.load, name="lcdfast_csrc", extra_ldflags=["-fopenmp"],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], is_python_module=False)
    devices = {"cpu"}
    cuda_home = cpp_extension.CUDA_HOME
    if torch.cuda.is_available() and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        try:
            build(sources=[*sources, str(CSRC / "masked_contrast_cuda.cu")])
            devices.add("cuda")
        except Exception as e:  # e.g. no libcudart under CUDA_HOME: keep the CPU ops
            print(f"lcdfast: csrc CUDA kernel not built ({type(e).__name__}: {_why(e)}); building the CPU ops alone",
                  file=sys.stderr)
    if "cuda" not in devices:
        build(sources=sources)
    torch.library.register_fake("lcdfast::masked_logits", _masked_logits_fake)
    torch.library.register_fake("lcdfast::skinny_linear", _skinny_linear_fake)
    torch.library.register_fake("lcdfast::js_divergence", _js_divergence_fake)
    torch.library.register_fake("lcdfast::quant_linear", _quant_linear_fake)
    torch.library.register_fake("lcdfast::quant_linear_a8", _quant_linear_fake)
    return frozenset(devices)


def _masked_logits_fake(hidden: Tensor, head: Tensor, ids: Tensor) -> Tensor:
    """Shapes only, for torch.compile: [B, E], [V, E], [B, K] -> [B, K] float32."""
    return hidden.new_empty(ids.shape, dtype=torch.float32)


def _js_divergence_fake(final_logits: Tensor, layer_logits: Tensor) -> Tensor:
    """[B, V], [L, B, V] -> [L, B] float32."""
    return layer_logits.new_empty(layer_logits.shape[:2])


def _quant_linear_fake(x: Tensor, q: Tensor, scale: Tensor, low: Tensor | None) -> Tensor:
    """[M, K], codes [N, K or K/2], [N, K/G], [N, K/G] or None -> [M, N] in x's dtype."""
    return x.new_empty((x.shape[0], q.shape[0]))


def _skinny_linear_fake(x: Tensor, weight: Tensor) -> Tensor:
    """[M, E], [N, E] -> [M, N] in x's dtype."""
    return x.new_empty((x.shape[0], weight.shape[0]))


load()  # builds only under LCDFAST_CSRC=1
