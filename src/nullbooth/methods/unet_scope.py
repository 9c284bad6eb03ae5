"""``nullbooth.scope: unet``: the null-space update and the certified budget on every UNet weight, not only ``attn2``.

On a model whose text pathway cannot express a subject (``tiny-sd``: its cross-attention reaches six colour words),
the ``attn2`` weights alone cannot learn it, whatever the method (``benchmarks/results/suite.md``); diffusers'
DreamBooth trains the whole UNet and does. The preservation argument is the same for any linear map: a weight ``W``
(a convolution as its patch matrix, :mod:`nullbooth.stats.weights`) whose update keeps ``ΔW X₀`` small keeps its
outputs on the prior inputs ``X₀``. So every ``Linear`` / ``Conv2d`` weight trains in place with, after every
optimizer step, the projected update ``W ← W₀ + (W − W₀) P`` (``P = U Uᵀ``, ``U`` its null space under the run's
threshold mode) and the certified wall ``‖ΔW X₀‖_F ≤ ε ‖W X₀‖_F`` (:mod:`nullbooth.methods.budget`, eq. 3–4), from
the weight's timestep-summed statistic (:mod:`nullbooth.runs.unet_moments`). Biases and norms stay frozen.

The bound is per weight, on the base model's inputs to it: upstream changes move a layer's inputs, so the model's
output on the prior can move more than ε — the preservation benchmark measures how much.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nullbooth.config import Config
from nullbooth.methods.adapters import adapter_targets
from nullbooth.methods.budget import LeakageBudget
from nullbooth.methods.leakage import project_update_
from nullbooth.runs.unet_moments import unet_moments
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.nullspace import null_space
from nullbooth.stats.weights import Weighted, unet_weights, weight_matrix


def other_weights(unet: nn.Module, cfg: Config) -> dict[str, Weighted]:
    """Every ``Linear`` / ``Conv2d`` weight of ``unet`` outside the ``attn2`` projections ``cfg`` protects."""
    nb = cfg.nullbooth
    protected = adapter_targets(unet, cross_attention_layers(unet, nb.cross_attention_layers),
                                nb.collect_features.selected())
    return unet_weights(unet, exclude=protected)


def other_statistics(cfg: Config, stats_run: str | Path, pipe
                     ) -> tuple[dict[str, Weighted], dict[str, SecondMoment]]:
    """:func:`other_weights` and their statistics over ``stats_run``'s trajectories: read, or sampled and written."""
    weights = other_weights(pipe.unet, cfg)
    return weights, unet_moments(stats_run, pipe, weights, batch_size=cfg.nullbooth.collection_batch_size)


class UNetWeights:
    """The weights outside ``attn2`` under one threshold mode and budget: trained in place, projected after each step.

    A weight whose null space is empty under the threshold stays frozen. ``report`` gives each trained weight's
    ``leak_preserved``: eq. 3 on the run's statistic, as the model holds it.
    """

    def __init__(self, weights: Mapping[str, Weighted], stats: Mapping[str, SecondMoment], mode: str,
                 threshold: float, epsilon: float | None) -> None:
        self.modules: dict[str, Weighted] = {}
        self.W0: dict[str, torch.Tensor] = {}
        self.P: dict[str, torch.Tensor | None] = {}  # None: the whole input space, nothing to project
        self.budgets: dict[str, LeakageBudget] = {}
        self.info: dict[str, dict[str, Any]] = {}
        for path, module in weights.items():
            C = stats[path].moment()
            space = null_space(C, mode, threshold)
            self.info[path] = {"dim": space.dim, "null_dim": space.null_dim}
            if space.null_dim == 0:
                continue
            W = weight_matrix(module)
            self.modules[path] = module
            self.W0[path] = W.detach().clone()
            U = space.basis
            self.P[path] = None if space.null_dim == space.dim else (U @ U.T).to(W.device, torch.float32)
            # ε = None measures (the report, γ's penalty) without a wall.
            self.budgets[path] = LeakageBudget(epsilon, C, W, U, full_weight=True)
            module.weight.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [m.weight for m in self.modules.values()]

    @torch.no_grad()
    def after_step(self) -> None:
        for path, module in self.modules.items():
            W = weight_matrix(module)
            if self.P[path] is not None:
                project_update_(W, self.W0[path], self.P[path])
            self.budgets[path].enforce_(W, self.W0[path])

    def penalties(self) -> list[torch.Tensor]:
        """``L(ΔW)²`` of every weight, differentiable (the soft form's terms)."""
        return [b.penalty(weight_matrix(self.modules[p]) - self.W0[p]) for p, b in self.budgets.items()]

    def report(self) -> dict[str, dict[str, Any]]:
        facts = {p: {"trained": p in self.modules, **i} for p, i in self.info.items()}
        for path, budget in self.budgets.items():
            delta = weight_matrix(self.modules[path]).detach().double() - self.W0[path].double()
            facts[path].update(leak_preserved=budget.leakage(delta),
                               leakage_budget=budget.epsilon, budget_active_steps=int(budget.active_steps))
        return facts
