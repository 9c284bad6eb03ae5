"""Null-space adapters: train cross-attention weights only where prior knowledge does not look.

For a protected weight ``W`` (torch ``[out, in]``) whose prior inputs ``X₀`` have the uncentered second
moment ``C = V Λ Vᵀ``, the null-space basis ``U`` (``[in, k]``, the eigenvectors with ``λ`` under the
threshold) gives the update family (DESIGN §2, AlphaEdit eq. 5–7)

    ΔW = M Uᵀ,          M ∈ ℝ^{out×k} trainable, U fixed,                                  (1)

so ``ΔW X₀ = M (Uᵀ X₀)`` vanishes on the protected span whatever ``M`` an optimizer produces: (1) equals
the seed's ``Δ' = Δ P`` with ``P = U Uᵀ`` but needs no projection step and carries no optimizer state
outside the null space. Its leakage on the preserved inputs is bounded by
``‖ΔW X₀‖²_F / n = tr(ΔW C ΔWᵀ) ≤ ‖ΔW‖²_F · λ_max(null)``.

When full weights are trained instead, the optimizer *update* is projected after every step,
``W ← W_old + (W_new − W_old) P`` (:func:`project_update_`), so Adam's moments and weight decay stay
inside the projection; projecting the gradient before Adam would not (Adam rescales coordinates).

Everything here selects modules structurally (``<attn2 path>.to_q`` …), never by substring; the injector
validates every target before it touches the model; the files written are safetensors + JSON; and
:func:`export_diffusers_lora` writes a ``pytorch_lora_weights.safetensors`` that plain
``StableDiffusionPipeline.load_lora_weights`` reads (``ΔW = B A`` with ``B = M``, ``A = Uᵀ``, scale 1).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from nullbooth import __version__
from nullbooth.config import FEATURES, NullspaceMode
from nullbooth.errors import NullBoothError
from nullbooth.filenames import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEGACY_ADAPTER_CONFIG,
    LORA_WEIGHTS,
)
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.runs.layout import load_summed_statistics, read_manifest
from nullbooth.stats.capture import (
    WEIGHT_OF_FEATURE,
    CrossAttentionLayer,
    cross_attention_layers,
    unwrap_linear,
)
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.nullspace import empty_fix, full_fix, null_space

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "nullbooth-adapter"
ADAPTER_FORMAT_VERSION = 1
ORTHONORMAL_ATOL = 1e-4
FEATURE_OF_WEIGHT: dict[str, str] = {w: f for f, w in WEIGHT_OF_FEATURE.items()}
NULLSPACE_MODES: tuple[str, ...] = get_args(NullspaceMode)


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


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: adapter factors stay fp32 under fp16/bf16 base weights (mixed-precision practice)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- the layer


class NullSpaceLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the null-space update ``ΔW = M Uᵀ`` (eq. 1).

    ``forward(x) = base(x) + (x U) Mᵀ``. ``U`` (``basis``, ``[in, k]``) is a fixed orthonormal buffer,
    ``M`` (``[out, k]``) the only trainable parameter, initialised to zero so the wrapped model starts
    equal to the base model. The base weight and bias are frozen (a bias cannot be protected by an
    input-space projector, DESIGN §2). ``k = 0`` is allowed: no parameter, the layer is the identity
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
        dtype = _float_dtype(base.weight.dtype)
        device = base.weight.device
        self.register_buffer("basis", basis.detach().to(device=device, dtype=dtype).contiguous())  # U [in, k]
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
        problem = _basis_problem(basis, module.in_features)
        if problem:
            problems.append(f"{path}: {problem}")
    if problems:
        raise NullBoothError(f"cannot inject null-space adapters, {len(problems)} problem(s): " + "; ".join(problems))
    wrappers: dict[str, NullSpaceLinear] = {}
    for path, basis in bases.items():
        parent, child = _parent_and_child(unet, path)
        wrapper = NullSpaceLinear(getattr(parent, child), basis)
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


# --------------------------------------------------------------------------- bases from a collection run


def bases_from_run(run_dir: str | Path, layers: Sequence[CrossAttentionLayer | str] | None = None,
                   features: Sequence[str] | None = None, mode: str | None = None, threshold: float | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Null-space bases ``U`` (float64 ``[in, k]``) of every target from a run's timestep-summed statistics.

    One projector per weight comes from ``Σ_t Σ xxᵀ`` (DESIGN §2). ``layers``/``features`` default to
    the run's; ``mode``/``threshold`` to the run's ``nullspace_mode``/``nullspace_threshold``. k and v
    read the same text statistic, so its ``eigh`` is computed once and both get the same tensor.
    ``CrossAttentionLayer`` arguments are checked against the run (names, input widths): all mismatches
    are reported in one error. The second value holds per target ``dim``, ``null_dim``,
    ``lambda_max_null`` (the leakage bound: ``‖ΔW X₀‖²_F / n ≤ ‖ΔW‖²_F · lambda_max_null``), ``lambda_min``,
    ``lambda_max``, ``n_samples``, ``mode``, ``threshold``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise NullBoothError(
            f"{run_dir} is an incomplete collection run (status {manifest.get('status')!r}); "
            "finish it with `nullbooth collect` (it resumes) or point at a complete run"
        )
    settings = manifest.get("nullbooth", {})
    mode = mode if mode is not None else settings.get("nullspace_mode", "absolute")
    if mode not in NULLSPACE_MODES:
        raise NullBoothError(f"nullspace_mode: expected one of {list(NULLSPACE_MODES)}, got {mode!r}")
    threshold = float(threshold if threshold is not None else settings.get("nullspace_threshold", 2e-2))
    run_layers = {entry["name"]: entry for entry in manifest["layers"]}
    run_features = list(manifest["features"])
    features = list(features) if features is not None else run_features

    problems = []
    missing_features = [f for f in features if f not in run_features]
    if missing_features:
        problems.append(f"features {missing_features} were not collected (the run has {run_features})")
    selected: list[tuple[str, CrossAttentionLayer | None]] = []
    for layer in layers if layers is not None else list(run_layers):
        name = layer.name if isinstance(layer, CrossAttentionLayer) else str(layer)
        if name not in run_layers:
            problems.append(f"layer {name} is not in the run")
            continue
        selected.append((name, layer if isinstance(layer, CrossAttentionLayer) else None))
        if isinstance(layer, CrossAttentionLayer):
            for f in features:
                recorded = run_layers[name].get("weight_shapes", {}).get(f)
                if recorded is not None and list(recorded) != list(layer.linear(f).weight.shape):
                    problems.append(f"{target_name(name, f)}: the run recorded weight {recorded}, "
                                    f"the model has {list(layer.linear(f).weight.shape)}")
    if problems:
        raise NullBoothError(
            f"the statistics run {run_dir} does not match the requested layers ({len(problems)} problem(s)): "
            + "; ".join(problems) + "; collect statistics for this model and these layers (nullbooth collect)"
        )

    stats = load_summed_statistics(run_dir)
    cache: dict[int, Any] = {}  # id(statistic) → NullSpace: the shared text statistic is decomposed once
    bases: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, _ in selected:
        for f in features:
            stat = stats[(name, f)]
            if id(stat) not in cache:
                cache[id(stat)] = null_space(stat.moment(), mode, threshold)
            ns = cache[id(stat)]
            path = target_name(name, f)
            bases[path] = ns.basis
            info[path] = {
                "layer": name, "feature": f, "dim": ns.dim, "null_dim": ns.null_dim,
                "lambda_max_null": ns.leakage_bound(), "lambda_min": float(ns.eigenvalues[0]),
                "lambda_max": float(ns.eigenvalues[-1]), "n_samples": stat.count, "mode": mode, "threshold": threshold,
            }
    _warn_degenerate(info, mode, threshold)
    return bases, info


def _warn_degenerate(info: Mapping[str, Mapping[str, Any]], mode: str, threshold: float) -> None:
    empty = [p for p, i in info.items() if i["null_dim"] == 0]
    full = [p for p, i in info.items() if i["null_dim"] == i["dim"]]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(info)} weights have an empty null space under nullspace_mode '{mode}' "
            f"threshold {threshold:g}: nothing can be learned in "
            f"{', '.join(empty[:4])}{', …' if len(empty) > 4 else ''}; "
            f"{empty_fix(mode, [(info[p]['lambda_min'], info[p]['lambda_max']) for p in empty])}",
            stacklevel=3,
        )
    if full:
        warnings.warn(
            f"{len(full)} of {len(info)} weights have a null space equal to their whole input space under "
            f"nullspace_mode '{mode}' threshold {threshold:g}: nothing is protected in "
            f"{', '.join(full[:4])}{', …' if len(full) > 4 else ''}; {full_fix(mode)}",
            stacklevel=3,
        )


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
    """``‖ΔW X₀‖_F / ‖W X₀‖_F = sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`` from the second moment, in float64.

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


# --------------------------------------------------------------------------- save / load


def save_adapter(output_dir: str | Path, unet: nn.Module, config: Mapping[str, Any]) -> Path:
    """Write ``nullbooth_adapter.safetensors`` (``M`` per target, ``U`` per distinct basis, float32) and
    ``nullbooth_adapter_config.json`` (``config`` — method, base model, statistics run, thresholds … — plus targets,
    null dimensions and versions). Both files are written atomically. Returns ``output_dir``.

    k and v of every layer share the text basis; identical bases are stored once (``basis.<i>``).
    """
    import diffusers

    wrappers = null_space_adapters(unet)
    if not wrappers:
        raise NullBoothError("expected a UNet with null-space adapters to save, found none; inject them first")
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as err:
        raise NullBoothError(f"save_adapter: config must be JSON-serialisable ({err})") from None
    tensors: dict[str, torch.Tensor] = {}
    unique: list[torch.Tensor] = []
    targets: dict[str, dict[str, Any]] = {}
    for path, w in wrappers.items():
        U = w.basis.detach().to("cpu", torch.float32)
        idx = next((i for i, V in enumerate(unique) if V.shape == U.shape and torch.equal(V, U)), None)
        if idx is None:
            idx = len(unique)
            unique.append(U)
            tensors[f"basis.{idx}"] = U
        M = w.M.detach().to("cpu", torch.float32) if w.M is not None else torch.zeros(w.out_features, 0)
        tensors[f"{path}.M"] = M
        targets[path] = {"in_features": w.in_features, "out_features": w.out_features, "null_dim": w.null_dim,
                         "basis": f"basis.{idx}"}
    meta = {
        **dict(config),
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "targets": targets,
        "null_dims": {p: t["null_dim"] for p, t in targets.items()},
        "versions": {"nullbooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    meta.setdefault("method", "nullbooth")
    output_dir = Path(output_dir)
    save_tensors(output_dir / ADAPTER_WEIGHTS, tensors, {"format": "pt", "nullbooth_format": ADAPTER_FORMAT})
    write_json(output_dir / ADAPTER_CONFIG, meta)
    return output_dir


def _adapter_files(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    config = folder / ADAPTER_CONFIG
    if not config.exists() and (folder / LEGACY_ADAPTER_CONFIG).exists():
        config = folder / LEGACY_ADAPTER_CONFIG
    return folder / ADAPTER_WEIGHTS, config


def load_adapter(unet: nn.Module, path: str | Path) -> dict[str, Any]:
    """Inject the adapters saved by :func:`save_adapter` into ``unet``; return the saved config.

    Refuses, listing every mismatch, a model whose target names or widths differ from the saved ones.
    """
    weights_path, config_path = _adapter_files(path)
    meta = read_json(config_path, f"a nullbooth adapter config ({ADAPTER_CONFIG})")
    if meta.get("format") != ADAPTER_FORMAT:
        raise NullBoothError(f"{config_path} is not a nullbooth adapter config (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise NullBoothError(
            f"{config_path} has adapter format version {meta['format_version']}, this nullbooth reads up to "
            f"{ADAPTER_FORMAT_VERSION}; upgrade nullbooth"
        )
    tensors, _ = load_tensors(weights_path, f"nullbooth adapter weights ({ADAPTER_WEIGHTS})")
    problems: list[str] = []
    bases: dict[str, torch.Tensor] = {}
    for target, spec in meta["targets"].items():
        U, M = tensors.get(spec["basis"]), tensors.get(f"{target}.M")
        if U is None or M is None:
            problems.append(f"{target}: weights missing from {weights_path.name} (corrupt or mismatched files)")
            continue
        if tuple(U.shape) != (spec["in_features"], spec["null_dim"]) or tuple(M.shape) != (spec["out_features"], spec["null_dim"]):
            problems.append(f"{target}: stored tensors U {tuple(U.shape)}, M {tuple(M.shape)} disagree with the config")
            continue
        try:
            linear = unet.get_submodule(target)
        except AttributeError:
            problems.append(f"{target}: the model has no such module")
            continue
        if not isinstance(linear, nn.Linear):
            problems.append(f"{target}: expected nn.Linear, got {type(linear).__name__}")
            continue
        if (linear.in_features, linear.out_features) != (spec["in_features"], spec["out_features"]):
            problems.append(f"{target}: saved for [out={spec['out_features']}, in={spec['in_features']}], "
                            f"the model has [out={linear.out_features}, in={linear.in_features}]")
            continue
        bases[target] = U
    if problems:
        model = meta.get("pretrained_model_name_or_path") or meta.get("base_model") or "another model"
        raise NullBoothError(
            f"the adapter at {weights_path.parent} does not fit this UNet ({len(problems)} problem(s)): "
            + "; ".join(problems[:8]) + ("; …" if len(problems) > 8 else "")
            + f"; load it into the model it was trained on ({model})"
        )
    wrappers = inject_null_space_adapters(unet, bases)
    with torch.no_grad():
        for target, wrapper in wrappers.items():
            if wrapper.M is not None:
                wrapper.M.copy_(tensors[f"{target}.M"])
    return meta


# --------------------------------------------------------------------------- diffusers LoRA export


def lora_factors(delta_W: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """An exact low-rank factorisation ``ΔW = B A`` (``B`` ``[out, r]``, ``A`` ``[r, in]``) by float64 SVD.

    Singular values ``s_i ≤ rtol · s_max`` are dropped as zero, with ``rtol`` defaulting to
    ``max(out, in) · ε(dtype of ΔW)`` (the numerical rank at the precision ΔW is given in, as
    ``torch.linalg.matrix_rank``). The factors are balanced: ``B = U_r √S``, ``A = √S V_rᵀ``.
    The third value reports ``rank`` and ``dropped_fro`` (Frobenius norm of what was dropped, the exact
    reconstruction error before float32 storage) relative to ``‖ΔW‖_F``.
    """
    if delta_W.ndim != 2:
        raise NullBoothError(f"expected a weight update [out, in], got shape {tuple(delta_W.shape)}")
    if rtol is None:
        eps = torch.finfo(delta_W.dtype).eps if delta_W.is_floating_point() else torch.finfo(torch.float64).eps
        rtol = max(delta_W.shape) * eps
    D = delta_W.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    s_max = float(S[0]) if S.numel() else 0.0
    r = int((S > rtol * s_max).sum()) if s_max > 0 else 0
    root = S[:r].sqrt()
    B = U[:, :r] * root  # [out, r]
    A = root[:, None] * Vh[:r]  # [r, in]
    total = float(S.square().sum().sqrt())
    dropped = float(S[r:].square().sum().sqrt())
    return B, A, {"rank": r, "rtol": rtol, "dropped_fro_relative": dropped / total if total else 0.0}


def export_diffusers_lora(output_dir: str | Path,
                          deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] | None = None, *,
                          unet: nn.Module | None = None, rtol: float | None = None) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(output_dir)``.

    Give either ``unet`` (its injected :class:`NullSpaceLinear`: ``B = M``, ``A = Uᵀ``, rank ``k``, exact)
    or ``deltas``: per target path a ``(B, A)`` pair, or a dense ``ΔW`` that is factorised with
    :func:`lora_factors` (zero singular values dropped, tolerance ``rtol``). Keys are peft-style
    ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` (float32). The file carries diffusers'
    ``lora_adapter_metadata`` with ``lora_alpha = r`` for every module (``alpha_pattern = rank_pattern``),
    so the LoRA scale ``alpha / r`` is exactly 1; diffusers ≥ 0.34 reads it, older versions infer the
    same config from the shapes. Targets with rank 0 (empty null space, zero update) are left out.
    """
    if (deltas is None) == (unet is None):
        raise NullBoothError("export_diffusers_lora: give exactly one of `deltas` or `unet`")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if unet is not None:
        wrappers = null_space_adapters(unet)
        if not wrappers:
            raise NullBoothError("export_diffusers_lora: the UNet has no null-space adapters; inject or load them first")
        for path, w in wrappers.items():
            if w.M is not None:
                factors[path] = (w.M.detach(), w.basis.detach().T)  # B = M [out, k], A = Uᵀ [k, in]
    else:
        for path, value in deltas.items():
            if isinstance(value, torch.Tensor):
                B, A, report = lora_factors(value, rtol)
                log.info("%s: LoRA rank %d (rtol %.3g, dropped %.3g of ‖ΔW‖_F)", path, report["rank"],
                         report["rtol"], report["dropped_fro_relative"])
            else:
                B, A = value
                if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
                    raise NullBoothError(f"{path}: expected (B [out, r], A [r, in]), got {tuple(B.shape)}, {tuple(A.shape)}")
            if B.shape[1]:
                factors[path] = (B, A)
    if not factors:
        raise NullBoothError(
            "export_diffusers_lora: every update has rank 0 (empty null spaces or no change); nothing to export — "
            "raise nullbooth.nullspace_threshold so the adapters have room to learn"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, (B, A) in factors.items():
        tensors[f"unet.{path}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
        ranks[path] = int(B.shape[1])
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank, as diffusers does
    pattern = {p: k for p, k in ranks.items() if k != r}
    lora_config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                   "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
    metadata = {"format": "pt",
                "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True)}
    output_dir = Path(output_dir)
    save_tensors(output_dir / LORA_WEIGHTS, tensors, metadata)
    return output_dir / LORA_WEIGHTS


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, NullSpaceLinear):
        W = module.base_layer.weight.detach()
        return W if module.merged else W + module.get_delta_weight().to(W.dtype)
    return module.weight.detach()


def dense_deltas(unet_before_state: Mapping[str, torch.Tensor], unet_after: nn.Module,
                 layers: Sequence[CrossAttentionLayer | str] | None = None,
                 features: Sequence[str] = FEATURES) -> dict[str, torch.Tensor]:
    """``ΔW = W_after − W_before`` (``[out, in]``, the weights' dtype, at least float32) per target, for
    full-weight methods (exact whenever the two weights are within a factor 2 of each other, Sterbenz).

    ``unet_before_state`` is a (cloned) ``state_dict`` of the UNet before training (``<path>.weight`` or,
    for a wrapped model, ``<path>.base_layer.weight``). Adapters still injected in ``unet_after`` count with
    their ``ΔW``. Changed biases cannot be expressed as a LoRA: they are reported with a warning.
    """
    out: dict[str, torch.Tensor] = {}
    missing, bias_changed = [], []
    for path in adapter_targets(unet_after, layers, features):
        module = unet_after.get_submodule(path)
        before = unet_before_state.get(f"{path}.weight", unet_before_state.get(f"{path}.base_layer.weight"))
        if before is None:
            missing.append(f"{path}.weight")
            continue
        after = _effective_weight(module)
        if tuple(before.shape) != tuple(after.shape):
            missing.append(f"{path}.weight (shape {tuple(before.shape)} vs {tuple(after.shape)})")
            continue
        # Subtract in float64, store at the weights' precision (≥ float32): that precision is what
        # lora_factors' default tolerance refers to, so float32 rounding noise is not exported as rank.
        diff = after.to("cpu", torch.float64) - before.detach().to("cpu", torch.float64)
        out[path] = diff.to(_float_dtype(after.dtype))
        bias_before = unet_before_state.get(f"{path}.bias", unet_before_state.get(f"{path}.base_layer.bias"))
        if bias_before is not None and module.bias is not None and not torch.equal(bias_before.to(module.bias.device), module.bias.detach()):
            bias_changed.append(path)
    if missing:
        raise NullBoothError(
            f"dense_deltas: the saved state lacks {len(missing)} target weight(s) ({', '.join(missing[:4])}"
            f"{', …' if len(missing) > 4 else ''}); pass the state_dict of this UNet taken before training"
        )
    if bias_changed:
        warnings.warn(
            f"{len(bias_changed)} target bias(es) changed during training ({', '.join(bias_changed[:4])}); a LoRA "
            "cannot carry bias changes — freeze biases (DESIGN §2) or save the full UNet",
            stacklevel=2,
        )
    return out
