"""Which floating-point dtype to compute in, on the machine at hand.

bf16 is the fast dtype only where the hardware computes it: CUDA GPUs with bf16 support, and CPUs with AMX or
AVX512-BF16 (Sapphire Rapids and later Xeons: a bf16 matmul ran ~3.5x faster than fp32 on the project's Xeon). Elsewhere
torch emulates it, and on an AVX2-only CPU (an AMD EPYC Milan here) a 2048x576x8192 bf16 matmul ran at 0.4 GFLOP/s
against 69 GFLOP/s in fp32: a bf16 target or bf16 training there is two orders of magnitude slower, not faster.

`"auto"` (the default of `beagle train`, `beagle regenerate` and of the trainer's `bf16`) picks bf16 only where it is
native; asking for bf16 explicitly where it is not still works, with a warning that says what it costs.
"""

import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SlowBf16Warning(UserWarning):
    """bf16 was asked for on a device that does not compute it natively."""


def _device_type(device=None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def cpu_bf16_features() -> dict[str, bool | None]:
    """The CPU features that make bf16 matmuls fast (None where this torch cannot tell)."""
    probes = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {name: (bool(getattr(torch.cpu, probe)()) if hasattr(torch.cpu, probe) else None)
            for name, probe in probes.items()}


def bf16_is_native(device=None) -> bool:
    """Whether `device` (default: cuda when available, else cpu) computes bf16 matmuls natively."""
    kind = _device_type(device)
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        features = cpu_bf16_features()
        if all(value is None for value in features.values()):
            return True  # an older torch that cannot tell: do not second-guess the caller
        return any(features.values())
    return True  # xpu, mps, ...: bf16 is a native dtype there


def warn_if_slow_bf16(what: str, device=None) -> None:
    """Warn that `what` runs in bf16 on a device that only emulates it."""
    if not bf16_is_native(device):
        message = (f"{what} in bfloat16 on a {_device_type(device)} without native bf16 (no AMX / AVX512-BF16; "
                   f"features {cpu_bf16_features()}): torch emulates it, often far slower than float32 "
                   "(measured ~170x on an AVX2-only CPU). Use float32 here, or 'auto'.")
        warnings.warn(message, SlowBf16Warning, stacklevel=3)


def resolve_dtype(name: str, device=None, what: str = "the target") -> torch.dtype:
    """A dtype by name; `"auto"` is bfloat16 where `device` computes it natively, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_native(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype expected one of auto, {', '.join(DTYPES)}; found {name!r}.")
    if DTYPES[name] is torch.bfloat16:
        warn_if_slow_bf16(what, device)
    return DTYPES[name]
