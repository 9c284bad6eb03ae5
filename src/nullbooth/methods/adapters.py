"""Null-space adapters: train cross-attention weights only where prior knowledge does not look.

For a protected weight ``W`` (torch ``[out, in]``) whose prior inputs ``X₀`` have the uncentered second
moment ``C = V Λ Vᵀ``, the null-space basis ``U`` (``[in, k]``, the eigenvectors with ``λ`` under the
threshold) gives the update family (docs/design.md §2, AlphaEdit eq. 5–7)

    ΔW = M Uᵀ,          M ∈ ℝ^{out×k} trainable, U fixed,                                  (1)

so ``ΔW X₀ = M (Uᵀ X₀)`` vanishes on the protected span whatever ``M`` an optimizer produces: (1) equals
the seed's ``Δ' = Δ P`` with ``P = U Uᵀ`` but needs no projection step and carries no optimizer state
outside the null space. Its leakage on the preserved inputs is bounded by
``‖ΔW X₀‖²_F / n = tr(ΔW C ΔWᵀ) ≤ ‖ΔW‖²_F · λ_max(null)`` (:mod:`nullbooth.methods.leakage`).

This module holds the wrapper layer (:class:`NullSpaceLinear`, peft's ``base_layer`` convention) and
putting it in and out of a UNet. Targets are selected structurally (``<attn2 path>.to_q`` …) with the
one attn2 finder :func:`nullbooth.stats.capture.cross_attention_layers`, never by substring, and the
injector validates every target before it touches the model. The bases come from a collection run
(:func:`nullbooth.methods.adapter_files.bases_from_run`); files are written by
:mod:`nullbooth.methods.adapter_files` and :mod:`nullbooth.methods.lora_export`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nullbooth.config import FEATURES
from nullbooth.errors import NullBoothError
from nullbooth.stats.capture import (
    WEIGHT_OF_FEATURE,
    CrossAttentionLayer,
    cross_attention_layers,
    unwrap_linear,
)

ORTHONORMAL_ATOL = 1e-4


# --------------------------------------------------------------------------- names


def target_name(layer_name: str, feature: str) -> str:
    """``<attn2 path>.to_q`` / ``.to_k`` / ``.to_v`` / ``.to_out.0``: the module path of one protected weight."""
    if feature not in WEIGHT_OF_FEATURE:
        raise NullBoothError(f"expected a feature in {list(WEIGHT_OF_FEATURE)}, got {feature!r}")
    return f"{layer_name}.{WEIGHT_OF_FEATURE[feature]}"


def split_target(path: str) -> tuple[str, str]:
    """Inverse of :func:`target_name`: ``(attn2 path, feature)``."""
    for feature, weight in WEIGHT_OF_FEATURE.items():
        if path.endswith(f".{weight}"):
            return path[: -len(weight) - 1], feature
    raise NullBoothError(
        f"expected a target path ending in {', '.join('.' + w for w in WEIGHT_OF_FEATURE.values())}, got {path!r}"
    )


def _parent_and_child(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), child


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: adapter factors stay fp32 under fp16/bf16 base weights (mixed-precision practice)."""
    return torch.promote_types(dtype, torch.float32)


def adapter_basis(basis: torch.Tensor, base: nn.Linear) -> torch.Tensor:
    """``basis`` as an adapter of ``base`` keeps it: on its device, at least float32, contiguous (no copy when it
    already is)."""
    return basis.detach().to(device=base.weight.device, dtype=float_dtype(base.weight.dtype)).contiguous()


# --------------------------------------------------------------------------- the layer


class NullSpaceLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the null-space update ``ΔW = M Uᵀ`` (eq. 1).

    ``forward(x) = base(x) + (x U) Mᵀ``. ``U`` (``basis``, ``[in, k]``) is a fixed orthonormal buffer,
    ``M`` (``[out, k]``) the only trainable parameter, initialised to zero so the wrapped model starts
    equal to the base model. The base weight and bias are frozen (a bias cannot be protected by an
    input-space projector, docs/design.md §2). ``k = 0`` is allowed: no parameter, the layer is the identity
    wrapper of ``base``.
    """

    def __init__(self, base: nn.Linear, basis: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise NullBoothError(f"NullSpaceLinear wraps an nn.Linear, got {type(base).__name__}")
        basis = torch.as_tensor(basis)
        if basis.ndim != 2 or basis.shape[0] != base.in_features:
            raise NullBoothError(
                f"expected a basis of shape [in={base.in_features}, k], got {tuple(basis.shape)}"
            )
        self.base_layer = base
        # Remember the flags so remove_adapters() hands back the module exactly as it came.
        self._base_requires_grad = {name: p.requires_grad for name, p in base.named_parameters(recurse=False)}
        for p in base.parameters(recurse=False):
            p.requires_grad_(False)
        self.register_buffer("basis", adapter_basis(basis, base))  # U [in, k]
        dtype, device = self.basis.dtype, self.basis.device
        k = basis.shape[1]
        if k:
            self.M = nn.Parameter(torch.zeros(base.out_features, k, device=device, dtype=dtype))  # [out, k]
        else:
            self.register_parameter("M", None)
        self.merged = False

    # nn.Linear's public surface, so processors reading `attn.to_q.weight.dtype` keep working.
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def null_dim(self) -> int:
        return self.basis.shape[1]

    def get_delta_weight(self) -> torch.Tensor:
        """``ΔW = M Uᵀ`` (``[out, in]``, adapter dtype); zeros when ``k = 0``."""
        if self.M is None:
            return torch.zeros(self.out_features, self.in_features, dtype=self.basis.dtype, device=self.basis.device)
        return self.M @ self.basis.T  # [out, k] @ [k, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., out]
        if self.M is None or self.merged:
            return result
        z = x.to(self.basis.dtype) @ self.basis  # [..., k]: coordinates in the null space; 0 on the protected span
        return result + (z @ self.M.T).to(result.dtype)  # [..., out]

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W + ΔW`` in place; the forward then uses the base layer alone."""
        if self.merged:
            warnings.warn("NullSpaceLinear.merge: already merged; nothing done", stacklevel=2)
            return
        if self.M is not None:
            self.base_layer.weight.add_(self.get_delta_weight().to(self.base_layer.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W − ΔW`` (equal to the original weight up to one rounding of the weight dtype)."""
        if not self.merged:
            warnings.warn("NullSpaceLinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        if self.M is not None:
            self.base_layer.weight.sub_(self.get_delta_weight().to(self.base_layer.weight.dtype))
        self.merged = False

    def release(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` with its ``requires_grad`` flags restored (its weight as it is now)."""
        for name, p in self.base_layer.named_parameters(recurse=False):
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, null_dim={self.null_dim}, merged={self.merged}"


# --------------------------------------------------------------------------- selecting and injecting


def adapter_targets(unet: nn.Module, layers: Sequence[CrossAttentionLayer | str] | None = None,
                    features: Sequence[str] = FEATURES) -> dict[str, nn.Linear]:
    """The protected linear layers, chosen structurally: ``{"<attn2>.to_q": nn.Linear, …}``.

    ``layers`` are ``CrossAttentionLayer`` objects or attn2 paths (``None``: every attn2 of the UNet).
    Already-wrapped targets yield their base ``nn.Linear``.
    """
    unknown = [f for f in features if f not in WEIGHT_OF_FEATURE]
    if unknown:
        raise NullBoothError(f"expected features among {list(WEIGHT_OF_FEATURE)}, got {unknown}")
    if layers is None:
        names = [layer.name for layer in cross_attention_layers(unet)]
    else:
        names = [layer.name if isinstance(layer, CrossAttentionLayer) else str(layer) for layer in layers]
    out: dict[str, nn.Linear] = {}
    problems = []
    for name in names:
        for feature in features:
            path = target_name(name, feature)
            try:
                linear = unwrap_linear(unet.get_submodule(path))
            except AttributeError:
                linear = None
            if linear is None:
                problems.append(path)
            else:
                out[path] = linear
    if problems:
        raise NullBoothError(f"expected nn.Linear modules at {problems}, found none; is this the UNet the layers came from?")
    return out


def attention_targets(unet: nn.Module) -> dict[str, nn.Linear]:
    """diffusers' default LoRA targets (``train_dreambooth_lora.py``): ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
    attention of the UNet, self- (``attn1``) and cross-attention (``attn2``) alike, chosen structurally — every module
    holding all four as ``nn.Linear`` (already-wrapped ones yield their base layer)."""
    out: dict[str, nn.Linear] = {}
    for path, module in unet.named_modules():
        linears = {}
        for weight in WEIGHT_OF_FEATURE.values():
            try:
                linears[f"{path}.{weight}"] = unwrap_linear(module.get_submodule(weight))
            except AttributeError:
                break
        if len(linears) == len(WEIGHT_OF_FEATURE) and all(linears.values()):
            out.update(linears)
    if not out:
        raise NullBoothError(f"expected attention modules with {'/'.join(WEIGHT_OF_FEATURE.values())} projections in "
                             f"the UNet, found none in {type(unet).__name__}; is this a Stable Diffusion UNet?")
    return out


def null_space_adapters(unet: nn.Module) -> dict[str, NullSpaceLinear]:
    """Every injected ``NullSpaceLinear`` by module path."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, NullSpaceLinear)}


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable ``M`` of every adapter (``k > 0``), in module order: what the optimizer gets."""
    return [m.M for m in null_space_adapters(unet).values() if m.M is not None]


def _basis_problem(basis: Any, in_features: int) -> str | None:
    if not isinstance(basis, torch.Tensor):
        return f"expected a torch.Tensor basis, got {type(basis).__name__}"
    if basis.ndim != 2 or basis.shape[0] != in_features:
        return f"expected a basis of shape [in={in_features}, k], got {tuple(basis.shape)}"
    if not basis.is_floating_point() or not torch.isfinite(basis).all():
        return "basis is not a finite floating-point tensor"
    k = basis.shape[1]
    if k:
        U = basis.detach().to("cpu", torch.float64)
        err = float((U.T @ U - torch.eye(k, dtype=torch.float64)).abs().max())
        if err > ORTHONORMAL_ATOL:
            return f"basis columns are not orthonormal (max |UᵀU − I| = {err:.3g} > {ORTHONORMAL_ATOL:g})"
    return None


def inject_null_space_adapters(unet: nn.Module, bases: Mapping[str, torch.Tensor]) -> dict[str, NullSpaceLinear]:
    """Wrap each ``bases`` target (a module path) in a :class:`NullSpaceLinear` with that basis.

    Every target is validated first — the module exists, is an unwrapped ``nn.Linear``, the basis is
    ``[in, k]`` with orthonormal columns (``max |UᵀU − I| ≤ 1e-4``) — and one ``NullBoothError`` lists
    all problems; the model is only modified when there is none.
    """
    if not bases:
        raise NullBoothError("expected at least one target basis to inject, got none")
    problems: list[str] = []
    # k and v of every layer share one text basis: it is checked, converted and stored once (SDXL: 140 targets,
    # each check an O(in·k²) float64 product and each copy 16 MB).
    checked: dict[tuple[int, int], str | None] = {}
    for path, basis in bases.items():
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such module")
            continue
        if isinstance(module, NullSpaceLinear):
            problems.append(f"{path}: already has a null-space adapter (call remove_adapters or merge_adapters first)")
            continue
        parts = path.split(".")
        if any(isinstance(unet.get_submodule(".".join(parts[:i])), NullSpaceLinear) for i in range(1, len(parts))):
            problems.append(f"{path}: lies inside a null-space adapter; target the wrapped layer's own path")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"{path}: expected nn.Linear, got {type(module).__name__}")
            continue
        key = (id(basis), module.in_features)
        if key not in checked:
            checked[key] = _basis_problem(basis, module.in_features)
        problem = checked[key]
        if problem:
            problems.append(f"{path}: {problem}")
    if problems:
        raise NullBoothError(f"cannot inject null-space adapters, {len(problems)} problem(s): " + "; ".join(problems))
    wrappers: dict[str, NullSpaceLinear] = {}
    converted: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # by (basis, base weight dtype, device)
    for path, basis in bases.items():
        parent, child = _parent_and_child(unet, path)
        base = getattr(parent, child)
        key = (id(basis), base.weight.dtype, base.weight.device)
        if key not in converted:
            converted[key] = adapter_basis(basis, base)
        wrapper = NullSpaceLinear(base, converted[key])  # already converted: its buffer is this tensor, shared
        setattr(parent, child, wrapper)
        wrappers[path] = wrapper
    return wrappers


def remove_adapters(unet: nn.Module) -> None:
    """Put the original ``nn.Linear`` objects back (unmerging first); the adapters' ``M`` is dropped."""
    for path, wrapper in null_space_adapters(unet).items():
        if wrapper.merged:
            wrapper.unmerge()
        parent, child = _parent_and_child(unet, path)
        setattr(parent, child, wrapper.release())


def merge_adapters(unet: nn.Module) -> None:
    """``W ← W + ΔW`` for every adapter, then the plain ``nn.Linear`` replaces its wrapper."""
    for path, wrapper in null_space_adapters(unet).items():
        if not wrapper.merged:
            wrapper.merge()
        parent, child = _parent_and_child(unet, path)
        setattr(parent, child, wrapper.release())
