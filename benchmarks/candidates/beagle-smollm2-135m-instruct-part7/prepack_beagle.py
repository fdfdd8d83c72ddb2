"""Prepacked CPU linear layers: the same weights, read by oneDNN in a blocked layout prepared once.

Speculative decoding verifies several tokens in one target forward, so on a CPU its cost depends on how the BLAS
handles matmuls with a handful of rows. On a 2-core AMD EPYC (AVX2, fp32) PyTorch's default path
(`torch.nn.functional.linear`, i.e. MKL) takes 120 ms for one SmolLM2-135M token on a 256-token cache but 204 ms for 2
tokens and 216 ms for 4: verifying is expensive. With each weight reordered once into oneDNN's blocked layout the same
forwards take 106 / 118 / 133 ms (benchmarks/verify_cost.py): decoding itself is faster and a multi-token forward
costs little more than a one-token one (README "Generation"; the bench with and without it in "Results").

`prepack_linear_weights(model)` swaps every `nn.Linear` of a model for a [`PrepackedLinear`] holding the same
`Parameter`s (tied weights stay tied, `state_dict()` is unchanged) plus the packed copy. Gradient-free forwards on CPU
in float32 (bfloat16 where the CPU packs it) use the packed copy; anything else (autograd, another device or dtype)
falls back to `F.linear`. If the weight changes (in-place update, `.to()`), it is repacked on the next forward. The
results equal `F.linear`'s up to float rounding (a different summation order), so compare greedy outputs between runs
that both use the packed model, as `beagle bench --prepack` does.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE: dict = {}


def prepacking_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU can pack linear weights of `dtype` for oneDNN (float32: any CPU build with
    MKL-DNN; bfloat16: CPUs with AVX512-BF16-class or AVX-NE-CONVERT support). Probed once per dtype."""
    if dtype not in _PACKABLE:
        ok = (dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
        if ok:
            try:
                torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
            except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
                ok = False
        _PACKABLE[dtype] = ok
    return _PACKABLE[dtype]


def is_packable_linear(module: nn.Module) -> bool:
    """A plain `nn.Linear`, or a subclass that keeps `nn.Linear`'s computation and says so with the class attribute
    `prepack_as_linear = True` (e.g. Beagle's zero-initialised state projections). Other subclasses (quantised,
    parametrised or otherwise customised linears) are left alone."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear)
                                          and type(module).__dict__.get("prepack_as_linear", False) is True)


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` whose gradient-free CPU forward reads a oneDNN-packed copy of its weight.

    Build it with [`PrepackedLinear.from_linear`]: it shares the original's `weight` and `bias` parameters. The packed
    copy is not a parameter or buffer: it is never saved and is rebuilt whenever the weight's storage, dtype or version
    changes. `use_packed = False` makes it a plain `nn.Linear` (used to time the unpacked path on the same model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 rows_hint: int = 8):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rows_hint = rows_hint
        self.use_packed = True
        self._packed = None
        self._packed_key = None
        self.unpacked_class = nn.Linear  # what `unpack_linear_weights` turns it back into

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows_hint: int = 8) -> "PrepackedLinear":
        """A `PrepackedLinear` sharing `linear`'s parameters (no copy of them), packed now."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                     rows_hint=rows_hint)  # on "meta": nothing allocated, the parameters are replaced next
        module.weight, module.bias = linear.weight, linear.bias
        module.unpacked_class = type(linear)
        module.train(linear.training)
        module.repack()
        return module

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows_hint: int = 8) -> "PrepackedLinear":
        """A bias-free, frozen `PrepackedLinear` over `weight` (out_features x in_features), e.g. gathered head rows."""
        module = cls(weight.shape[1], weight.shape[0], bias=False, device="meta", rows_hint=rows_hint)
        module.weight = nn.Parameter(weight.detach(), requires_grad=False)
        module.repack()
        return module

    @staticmethod
    def _weight_key(w: torch.Tensor):
        return (w.data_ptr(), w.dtype, w.is_cpu, w._version)

    def repack(self) -> None:
        """(Re)build the packed copy from the current weight (no-op where the fast path cannot apply)."""
        w = self.weight
        if w.device.type != "cpu" or not prepacking_available(w.dtype):
            self._packed, self._packed_key = None, self._weight_key(w)  # not packable until the weight changes
            return
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows_hint)
        self._packed_key = self._weight_key(w)

    def _usable_packed(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed weight when a forward of `x` may read it (repacked first if the weight changed), else None.

        Runs for every linear layer of every decoding step (~210 per SmolLM2 token): each parameter is read once
        (a Module attribute lookup costs about a microsecond) and the cheapest checks come first."""
        w, b = self.weight, self.bias
        if not (self.use_packed and x.is_cpu and x.dtype == w.dtype and x.numel() != 0):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return None
        if self._packed_key != self._weight_key(w):
            self.repack()
        return self._packed  # None where this weight's device or dtype cannot be packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._usable_packed(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prepacked(rows_hint={self.rows_hint}, use_packed={self.use_packed})"


def prepack_linear_weights(model: nn.Module, rows_hint: int = 8) -> int:
    """Swap every `nn.Linear` in `model` for a [`PrepackedLinear`] sharing its parameters; returns how many.

    For inference on CPU (float32 or bfloat16 weights). Idempotent: layers already prepacked are left as they are.
    The model's parameters, `state_dict()` and `save_pretrained()` output are unchanged; memory grows by one packed
    copy of each linear weight (the originals stay, e.g. for a tied embedding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepack_linear_weights: expected a torch.nn.Module, found {type(model).__name__}.")
    if type(model) is nn.Linear:
        raise TypeError("prepack_linear_weights: expected a model containing linear layers, found a bare nn.Linear; "
                        "use `PrepackedLinear.from_linear(linear)` for a single layer.")
    if not isinstance(rows_hint, int) or rows_hint < 1:
        raise ValueError(f"prepack_linear_weights: `rows_hint` expected a positive int, found {rows_hint!r}.")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"prepack_linear_weights: the packed layout is for CPU inference; the model has parameters on "
                         f"{sorted(devices - {'cpu'})}. Move it to the CPU first, or leave it unpacked.")
    dtypes = {m.weight.dtype for m in model.modules() if is_packable_linear(m)}
    unpackable = sorted(str(d) for d in dtypes if not prepacking_available(d))
    if unpackable:
        raise RuntimeError(f"prepack_linear_weights: this torch build or CPU cannot pack linear weights of dtype "
                           f"{', '.join(unpackable)} (float32 needs oneDNN; bfloat16 also AVX512-BF16 or AVX-NE-CONVERT); "
                           f"use the model as it is.")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_packable_linear(child):
                setattr(parent, name, PrepackedLinear.from_linear(child, rows_hint))
                swapped += 1
    return swapped


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo [`prepack_linear_weights`]: the original linear layers (`nn.Linear`, or the opted-in subclass each was)
    sharing the same parameters again; returns how many."""
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PrepackedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.__class__ = child.unpacked_class  # nn.Linear's state, so a Linear subclass takes it as is
                linear.weight, linear.bias = child.weight, child.bias
                linear.train(child.training)
                setattr(parent, name, linear)
                restored += 1
    return restored


def uses_packed_path(module: nn.Module) -> bool:
    """Whether `module` is a [`PrepackedLinear`] with its packed path on. By class name, so that a checkpoint's
    remote-code copy of this file and the installed package recognise each other's layers."""
    return type(module).__name__ == PrepackedLinear.__name__ and bool(getattr(module, "use_packed", False))


def is_prepacked(model: nn.Module) -> bool:
    """Whether any linear layer of `model` is a [`PrepackedLinear`] with its packed path on."""
    return any(uses_packed_path(m) for m in model.modules())


@contextmanager
def packed_path(model: nn.Module, enabled: bool):
    """Within the block, every [`PrepackedLinear`] of `model` uses (`enabled=True`) or skips its packed copy (found by
    class name, as `uses_packed_path`: layers packed by a checkpoint's remote-code copy of this file count too)."""
    layers = [m for m in model.modules() if type(m).__name__ == PrepackedLinear.__name__]
    before = [m.use_packed for m in layers]
    for m in layers:
        m.use_packed = enabled
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.use_packed = flag
