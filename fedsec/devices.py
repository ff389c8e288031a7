"""Where tensors live, and in what precision the model computes.

Encoded data stays in host memory (fedsec.encoding.DATA); the model's computations and
their results are made on the model's own device, named explicitly at every construction
so that nothing lands on an implicit default. `model.device` picks that device once
(`resolve_device`), and `training.precision` the autocast dtype of every forward: one
context, `autocast(model)`, entered where the model runs (training.target_hidden,
the frozen-prefix pass, generation).
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from fedsec.errors import ConfigError

# training.precision -> the autocast dtype (None: plain float32)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# model.dtype auto on a CUDA device: the base weights in the compute dtype
_AUTO_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_PRECISION_ATTR = "fedsec_autocast"


def model_device(model) -> torch.device:
    """Where the model's inputs and outputs go: its `device` (transformers and peft models
    name it: that of their first parameters), else that of its first parameter."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other entries, e.g. a layer index, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_device(name: str) -> torch.device:
    """`model.device` on this machine: auto is cuda when torch sees a CUDA device, else cpu.
    A device this machine lacks is a ConfigError (one line), never a silent fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise ConfigError("model.device", name, f"this machine has no CUDA device ({build}); use auto or "
                              "cpu, or install a CUDA build of torch into the environment first")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("model.device", name, f"this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.index is None:  # the current device, named: what its parameters will report
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device", name, "MPS is not available here; use auto or cpu")
    return device


def base_dtype(dtype: str, precision: str, device: torch.device) -> str:
    """`model.dtype` resolved: auto is the compute dtype on CUDA (bf16 base weights under bf16
    autocast, halving their memory), float32 elsewhere (CPU results stay fp32)."""
    if dtype != "auto":
        return dtype
    return _AUTO_DTYPE[precision] if device.type == "cuda" else "float32"


def set_precision(model, precision: str) -> None:
    """Make `autocast(model)` run the model's forwards in `precision` (training.precision)."""
    setattr(_causal_lm(model), _PRECISION_ATTR, AUTOCAST[precision])


def autocast_dtype(model) -> torch.dtype | None:
    """The autocast dtype `set_precision` gave the model (None: fp32)."""
    return getattr(_causal_lm(model), _PRECISION_ATTR, None)


def autocast(model):
    """The context every forward of `model` runs in: torch.autocast in the precision set by
    `set_precision` on the model's device type, or nothing for fp32."""
    dtype = autocast_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


# How far two computations of the same hidden states may differ, relative to each position's
# largest entry, and still be one computation (packing, the frozen-prefix cache, the trimmed last
# layer; each checked once per model): fp32 to rounding, usually about 2e-6 of a position's
# largest entry on SmolLM2, but frozen-prefix states read from the disk cache, computed by
# another process, were 3.7e-4 off the model's own forward in 4 of 8 fresh processes within a
# quarter of an hour (2026-12-07; a 2-core Xeon whose speed moved by a third between sessions),
# so fp32 allows 1e-2; half precision rounds every product to 8 (bf16) or 11 (fp16) bits and the
# layers carry that on: SmolLM2's 30 layers under bf16 autocast on a CPU put a position 2.4-3.1%
# of its largest entry off (2026-12-07). A structural difference (an ignored mask, a scaled
# input) is off by its whole size.
AGREEMENT_RTOL = {None: 1e-2, torch.bfloat16: 0.1, torch.float16: 2e-2}


def agrees(a: torch.Tensor, b: torch.Tensor, model) -> bool:
    """Whether `a` is `b` as `model` computes (packed, cached or trimmed against plain): every
    position (last dimension) within `AGREEMENT_RTOL` of the model's precision times `b`'s largest
    entry there. Per position: a few positions carry entries in the tens of thousands (massive
    activations), which would hide an error elsewhere in one scale."""
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= AGREEMENT_RTOL[autocast_dtype(model)] * b.abs().amax(-1, keepdim=True)).all())


# Why a model fails rows_independent, for the one-line refusals that follow from it
ROWS_DEPEND = ("bitsandbytes' 8-bit layers (LLM.int8) compute in higher precision every input column where any "
               "row of a batch has an outlier")


def rows_independent(model) -> bool:
    """Whether `model` computes each row of a batch on its own, up to float rounding. Not with
    bitsandbytes' 8-bit layers under an outlier threshold (LLM.int8; transformers' default 6.0):
    they compute in higher precision every input column where any row of the batch has an entry
    over it, so a row's numbers depend on the rows beside it (SmolLM2's last hidden state moved by
    5% of a position's largest entry; 4-bit NF4 2e-6, fp32 1e-6). Where they do, one party's data
    must not share a forward with another's: a client's update, or under record-level DP a
    record's gradient, would move with data its clipping does not bound."""
    return not any(type(m).__name__ == "Linear8bitLt" and getattr(getattr(m, "state", None), "threshold", 0.0) > 0
                   for m in model.modules())


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class PeakMemory:
    """The peak memory of a stretch of work on `device`: on CUDA the peak bytes torch's
    allocator held on it since `reset` (`cuda_allocated`); on the CPU the process's peak
    resident set so far (`rss_process_peak`, ru_maxrss). The CPU figure is not reset per
    stretch: resetting the kernel's high-water mark (clear_refs) would change what every
    other reader in the process (a benchmark, a profiler) sees."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss_process_peak"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> int:
        """Peak bytes (CUDA: since the last reset; CPU: since the process started)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
