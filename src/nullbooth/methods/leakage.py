"""How much a weight update disturbs the preserved inputs, and the projected update that keeps it at zero.

The leakage of ``ΔW`` on the preserved inputs ``X₀`` (uncentered second moment ``C = X₀ X₀ᵀ / n``) is

    ‖ΔW X₀‖_F / ‖W X₀‖_F = sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)),                              (2)

and a null-space update ``ΔW = M Uᵀ`` keeps its numerator under ``‖ΔW‖²_F · λ_max(null)`` (docs/design.md §2).

When full weights are trained instead, the optimizer *update* is projected after every step,
``W ← W_old + (W_new − W_old) P`` (:func:`project_update_`), so Adam's moments and weight decay stay
inside the projection; projecting the gradient before Adam would not (Adam rescales coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from nullbooth.errors import NullBoothError
from nullbooth.methods.adapters import null_space_adapters, split_target
from nullbooth.stats.moments import SecondMoment

# --------------------------------------------------------------------------- projected full-weight updates


@torch.no_grad()
def project_update_(param_new: torch.Tensor, param_old: torch.Tensor, P: torch.Tensor) -> None:
    """``W ← W_old + (W_new − W_old) P`` in place on ``param_new`` (the seed's ``Δ' = Δ P``).

    Call it right *after* ``optimizer.step()``: the whole update (Adam's rescaled moments and decoupled
    weight decay included) is projected, so ``W − W₀`` stays in ``{Δ : Δ = Δ P}`` step after step.
    Projecting the gradient before Adam does not give this: Adam's per-coordinate scaling leaves the
    null space. ``param_old`` may be the weight before the step or — recommended — the original
    weight ``W₀``: since ``W_old − W₀ = (W_old − W₀) P`` both give the same result in exact arithmetic,
    but re-projecting the total update from ``W₀`` keeps float rounding from accumulating outside the
    null space over many steps, and needs no per-step copy.
    """
    if param_new.shape != param_old.shape or param_new.ndim != 2:
        raise NullBoothError(
            f"expected two weights of one shape [out, in], got {tuple(param_new.shape)} and {tuple(param_old.shape)}"
        )
    d = param_new.shape[1]
    if tuple(P.shape) != (d, d):
        raise NullBoothError(f"expected a projector of shape [{d}, {d}] (input width), got {tuple(P.shape)}")
    dtype = torch.promote_types(P.dtype, torch.float32)
    old = param_old.to(dtype)
    delta = (param_new.to(dtype) - old) @ P.to(device=param_new.device, dtype=dtype)  # [out, in] @ [in, in]
    param_new.copy_((old + delta).to(param_new.dtype))


# --------------------------------------------------------------------------- leakage


def relative_leakage(delta_W: torch.Tensor, W: torch.Tensor, stat: SecondMoment | torch.Tensor) -> float:
    """Eq. 2, ``‖ΔW X₀‖_F / ‖W X₀‖_F = sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))``, from the second moment in float64.

    ``stat`` is the :class:`SecondMoment` of the preserved inputs (or ``C`` itself); ``n`` cancels. The
    bias is not part of ``W X₀`` (it is frozen). Returns ``inf`` when ``W X₀ = 0`` but ``ΔW X₀ ≠ 0``.
    """
    C = stat.moment() if isinstance(stat, SecondMoment) else torch.as_tensor(stat).to(torch.float64)
    C = C.to("cpu", torch.float64)
    dW = delta_W.detach().to("cpu", torch.float64)
    W = W.detach().to("cpu", torch.float64)
    if dW.shape != W.shape or W.shape[1] != C.shape[0]:
        raise NullBoothError(
            f"expected ΔW and W of one shape [out, {C.shape[0]}], got {tuple(dW.shape)} and {tuple(W.shape)}"
        )
    num = max(float(((dW @ C) * dW).sum()), 0.0)  # tr(ΔW C ΔWᵀ); ≥ 0 up to round-off
    den = max(float(((W @ C) * W).sum()), 0.0)
    return _ratio(num, den)


def leakage_on_features(delta_W: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """``‖ΔW X‖_F / ‖W X‖_F`` directly on features ``X`` (``[..., in]``, e.g. held-out prompts), float64."""
    dW = delta_W.detach().to("cpu", torch.float64)
    W = W.detach().to("cpu", torch.float64)
    X = X.detach().to("cpu", torch.float64).reshape(-1, W.shape[1])  # [n, in]
    return _ratio(float((X @ dW.T).square().sum()), float((X @ W.T).square().sum()))


def _ratio(num_sq: float, den_sq: float) -> float:
    if den_sq == 0.0:
        return 0.0 if num_sq == 0.0 else math.inf
    return math.sqrt(num_sq / den_sq)


def adapter_leakage(unet: nn.Module, stats: Mapping[tuple[str, str], SecondMoment]) -> dict[str, float]:
    """Relative leakage of every injected adapter on its statistic (``stats`` keyed ``(layer, feature)``,
    as :func:`nullbooth.runs.layout.load_summed_statistics` returns)."""
    out = {}
    for path, wrapper in null_space_adapters(unet).items():
        key = split_target(path)
        if key in stats:
            W = wrapper.base_layer.weight
            dW = wrapper.get_delta_weight()
            out[path] = relative_leakage(dW, W - dW.to(W.dtype) if wrapper.merged else W, stats[key])
    return out
