"""Decode-time weight layouts: fp32 transposed (exact) and weight-only int8 (approximate).

``transpose_linears(model)`` (the serving default, ``decode_weights: fp32``) replaces every
projection ``nn.Linear`` by :class:`TransposedLinear`: the same fp32 weight stored as ``(in, out)``
and multiplied as ``x @ weight_t``. The logits equal ``nn.Linear``'s to within ~1e-6 (the same
products, summed in another order at some shapes), and torch's CPU GEMM is faster with that
layout at decode shapes: a batch-8 decode step of the quick model 1.21x faster, of the ``small``
one 1.29x, and batch 1 1.03-1.04x (interleaved medians of single engine steps on this machine).
The LM head gets its own transposed copy, so a tied embedding table is held twice.

Batch-1 decoding on a CPU is bound by reading the weights (for the ``small`` preset, 21 MB of
fp32 per token; one pass over them costs ~0.7 ms here). ``quantize_int8(model)`` replaces every
projection ``nn.Linear`` (attention, FFN or MoE experts, and the LM head) by :class:`Int8Linear`:
int8 weights with one scale per output row (symmetric, ``absmax / 127``), multiplied by torch's
``_weight_int8pack_mm`` kernel (the gpt-fast one; AVX-512 on x86), whose activations are bf16.

What int8 costs: each projection's input and output are rounded to bf16 (8 significant bits), so
logits move by ~0.3% of their size. The MoE router (``gate``) and the embeddings, norms, RoPE,
attention and residual stream stay in full precision. Both are decoding/serving modes: they are
irreversible (convert a copy, or reload the checkpoint), and a converted model cannot be trained
or exported.
"""

from __future__ import annotations

import torch
from torch import nn

SKIP = ("gate",)  # MoE router: its logits are computed in fp32 from the weight directly


class TransposedLinear(nn.Module):
    """``y = x @ weight_t``: an ``nn.Linear``'s fp32 weight stored transposed, ``(in, out)``, contiguous."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_t", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transposed weight"


class Int8Linear(nn.Module):
    """``y = x @ (scale[:, None] * q).T`` with ``q`` int8 ``(out, in)`` and a bf16 ``scale`` per row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def check_supported(device: torch.device | str) -> None:
    """Raise ``ValueError`` naming the alternative if int8 decode weights cannot run on ``device``."""
    try:
        q = torch.zeros(8, 32, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32, dtype=torch.bfloat16, device=device), q,
                                           torch.ones(8, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"int8 decode weights are not supported on device {device!s} by this torch "
                         f"({torch.__version__}): {str(e).splitlines()[0]}; use decode weights 'fp32'") from e


@torch.no_grad()
def _swap_linears(model: nn.Module, make) -> nn.Module:
    """Replace every projection ``nn.Linear`` of ``model`` (not the MoE ``gate``) by ``make(weight)``."""
    device = next(model.parameters()).device
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIP]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(lin.weight).to(device))
    model.eval()
    return model


def transpose_linears(model: nn.Module) -> nn.Module:
    """Replace the projection layers of ``model`` in place by :class:`TransposedLinear`; returns ``model``.

    The LM head gets its own transposed copy; a tied embedding table stays as it is for lookups.
    """
    return _swap_linears(model, TransposedLinear)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the projection layers of ``model`` in place by :class:`Int8Linear`; returns ``model``.

    Tied embeddings stay tied in spirit: the embedding table stays fp32 for lookups and the LM
    head gets its own int8 copy.
    """
    check_supported(next(model.parameters()).device)
    return _swap_linears(model, Int8Linear)


def prepare_decode(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """``model`` converted in place for decoding: ``fp32`` (transposed, exact) or ``int8``."""
    if weights == "fp32":
        return transpose_linears(model)
    if weights == "int8":
        return quantize_int8(model)
    raise ValueError(f"decode weights {weights!r} are unknown: use 'fp32' or 'int8'")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
