"""The ``nullbooth`` method: ΔW confined to the null space of the prior-knowledge features (docs/design.md §2).

Two ways to train the same family of updates: ``adapter`` trains ``M`` in ``ΔW = M Uᵀ`` (exact,
default); ``projected`` trains the full weight and projects the whole optimizer update after each
step, ``W ← W₀ + (W − W₀) P``. Both are saved as the same adapter and its diffusers LoRA export.
``nullbooth.scope: unet`` extends the projected update and the budget to every UNet weight
(:mod:`nullbooth.methods.unet_scope`); the result is then the whole ``unet/`` folder.

``train_text_encoder`` adds a LoRA on the text encoder (rank ``lora_rank``, :meth:`Method.text_encoder_lora`),
trained without constraint. A LoRA rather than the whole encoder (diffusers' DreamBooth) because the result then
stays one diffusers LoRA file that plain ``load_lora_weights`` applies whole (UNet factors and encoder LoRA), and
the prior prompts' encodings move through a rank-``r`` change only. The guarantee does not extend to it:
``ΔW X₀ = 0`` holds for the attn2 inputs ``X₀`` of the *base* encoder, and a trained encoder moves the prior
prompts' encodings, so nothing bounds what the model does on them any more; :meth:`NullBooth.unprotected` says so
in the training report and a warning is logged at set-up.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from nullbooth.conditioning import encoder_names
from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_UNET_DIR
from nullbooth.methods.adapter_files import bases_from_run, save_adapter
from nullbooth.methods.adapters import (
    NullSpaceLinear,
    inject_null_space_adapters,
    null_space_adapters,
    split_target,
)
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.budget import LeakageBudget
from nullbooth.methods.leakage import project_update_
from nullbooth.methods.lora_export import TEXT_ENCODER, export_diffusers_lora, peft_lora_factors, update_factors
from nullbooth.methods.unet_scope import UNetWeights, other_statistics
from nullbooth.runs.layout import load_summed_statistics
from nullbooth.stats.nullspace import empty_fix

BUDGET_STATE = "leakage_budget.{}.active_steps"  # checkpoint key of a weight's projection count
UNPROTECTED_TEXT_ENCODER = (
    "train_text_encoder: the text encoder was trained without constraint; the null-space guarantee ΔW X₀ = 0 is "
    "about the attn2 inputs X₀ of the base encoder, and the trained encoder moves the prior prompts' encodings, so "
    "the guarantee (and the leakage figures on the prior features, computed on the base encodings) no longer covers "
    "them; train with train_text_encoder: false to keep it"
)

log = logging.getLogger(__name__)


class NullBooth(Method):
    """ΔW in the null space of the prior-knowledge features of every protected weight (docs/design.md §2).

    ``adapter``: ``W' = W + M Uᵀ`` with ``U`` from the run's timestep-summed statistics, ``M`` trained.
    ``projected``: ``W`` trained, then ``W ← W₀ + (W − W₀) P`` after each step (``P = U Uᵀ``), which
    projects Adam's whole update including weight decay; the result is saved as the same adapter,
    ``M = (W − W₀) U``, since ``W − W₀ = (W − W₀) U Uᵀ``.

    ``nullbooth.leakage_budget`` (ε) adds the certified wall of :mod:`nullbooth.methods.budget` after every
    step, in either mode; ``nullbooth.leakage_penalty`` (γ) the soft form ``γ Σ_W L(ΔW)²`` in the loss.
    """

    name = "nullbooth"
    others: UNetWeights | None = None  # scope unet: every UNet weight outside attn2

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        if stats_run is None:
            raise NullBoothError("method 'nullbooth' needs a statistics run; set nullbooth.original_knowledge_prompts "
                                 "or nullbooth.stats_run")
        self.stats_run = Path(stats_run)
        nb = self.cfg.nullbooth
        # Every check on the run happens before the model is touched.
        with warnings.catch_warnings():
            if nb.leakage_budget is not None:  # a whole-space "null space" is then deliberate: ε protects
                warnings.filterwarnings("ignore", message=".*whole input space")
            bases, self.info = bases_from_run(stats_run, self.layers(pipe), self.features(), nb.nullspace_mode,
                                              nb.nullspace_threshold)
        # The budget needs S itself; read once here (bases_from_run has checked the run), not per conversion.
        wants_stats = nb.leakage_budget is not None or bool(nb.leakage_penalty)
        self.stats = load_summed_statistics(self.stats_run) if wants_stats else None
        self.bases = {p: U for p, U in bases.items() if U.shape[1] > 0}
        self.trained = frozenset(self.bases)
        if not self.bases:
            spectra = [(i["lambda_min"], i["lambda_max"]) for i in self.info.values()]
            raise NullBoothError(
                f"every null space of {stats_run} is empty under nullspace_mode '{nb.nullspace_mode}' threshold "
                f"{nb.nullspace_threshold:g}: nothing can be trained; {empty_fix(nb.nullspace_mode, spectra)}; or "
                "train every direction under a certified budget (nullspace_mode: rank, nullspace_threshold: 0, "
                "leakage_budget: 0.05)"
            )
        self._freeze(pipe)
        self.others = self._other_weights(pipe) if nb.scope == "unet" else None
        text = [self.text_encoder_lora(pipe)] if self.trains_text_encoder else []
        if text:
            log.warning(UNPROTECTED_TEXT_ENCODER)
        self.update = "projected" if self.others is not None else self.cfg.nullbooth_update
        self.wrappers: dict[str, NullSpaceLinear] = {}
        self.budgets: dict[str, LeakageBudget] = {}
        if self.update == "adapter":
            self.wrappers = inject_null_space_adapters(pipe.unet, self.bases)
            # The adapters hold their float32 bases; the float64 originals would stay alive beside the optimiser
            # state for the whole run (GBs on SDXL with near-full null spaces).
            self.bases = {}
            # The adapter's own (rounded) basis: ΔW = M Uᵀ is certified as the model applies it.
            self.budgets = self._budgets({p: w.basis for p, w in self.wrappers.items()}, full_weight=False)
            return [{"params": [w.M for w in self.wrappers.values()], "lr": self.lr, "name": "unet"}, *text]
        # projected: full weights of the targets with room to move; W₀ and one P per distinct basis kept.
        self.W0: dict[str, torch.Tensor] = {}
        self.P: dict[str, torch.Tensor] = {}
        shared: dict[int, torch.Tensor] = {}
        for path, U in self.bases.items():
            weight = self.targets[path].weight
            weight.requires_grad_(True)
            self.W0[path] = weight.detach().clone()
            if id(U) not in shared:  # k and v share the text basis: one P for both
                shared[id(U)] = (U @ U.T).to(device=weight.device, dtype=torch.float32)  # P [in, in]
            self.P[path] = shared[id(U)]
        self.budgets = self._budgets(self.bases, full_weight=True)
        others = self.others.parameters() if self.others is not None else []
        return [{"params": [self.targets[p].weight for p in self.bases] + others, "lr": self.lr, "name": "unet"}, *text]

    def _other_weights(self, pipe) -> UNetWeights:
        """``scope: unet``: every UNet weight outside the protected ``attn2`` ones, from the run's UNet statistics."""
        nb = self.cfg.nullbooth
        weights, stats = other_statistics(self.cfg, self.stats_run, pipe)
        return UNetWeights(weights, stats, nb.nullspace_mode, nb.nullspace_threshold, nb.leakage_budget)

    def _budgets(self, bases: dict[str, torch.Tensor], *, full_weight: bool) -> dict[str, LeakageBudget]:
        """One :class:`LeakageBudget` per trained weight, on the run's float64 statistics (none without ε or γ)."""
        if self.stats is None:
            return {}
        moments: dict[int, torch.Tensor] = {}  # k and v share the text statistic: one S for both
        budgets = {}
        for path, U in bases.items():
            stat = self.stats[split_target(path)]
            S = moments.setdefault(id(stat), stat.moment())
            budgets[path] = LeakageBudget(self.cfg.nullbooth.leakage_budget, S, self.targets[path].weight, U,
                                          full_weight=full_weight)
        return budgets

    @torch.no_grad()
    def after_step(self) -> None:
        if self.update == "projected":
            for path, W0 in self.W0.items():
                # Project the cumulative update from W₀: equal to projecting each step's update (earlier
                # ones are already in the null space, P is idempotent) without accumulating round-off.
                project_update_(self.targets[path].weight, W0, self.P[path])
        for path, budget in self.budgets.items():
            if self.update == "projected":
                budget.enforce_(self.targets[path].weight, self.W0[path])
            else:
                budget.enforce_(self.wrappers[path].M)
        if self.others is not None:
            self.others.after_step()

    def penalty(self) -> torch.Tensor | None:
        gamma = self.cfg.nullbooth.leakage_penalty
        if not gamma:
            return None
        terms = [budget.penalty(self.wrappers[p].M if self.update == "adapter" else self.targets[p].weight - self.W0[p])
                 for p, budget in self.budgets.items()]
        terms += self.others.penalties() if self.others is not None else []
        return gamma * torch.stack(terms).sum()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        budgets = {**self.budgets, **(self.others.budgets if self.others is not None else {})}
        return {**super().checkpoint_state(), **{BUDGET_STATE.format(p): b.active_steps for p, b in budgets.items()}}

    def weight_changes(self) -> WeightChanges:
        # float64 products: the report certifies ΔW = M Uᵀ as the fp32 factors define it, not a rounded product.
        if self.update == "adapter":
            wrappers = null_space_adapters(self.pipe.unet)

            def change(path: str) -> tuple[torch.Tensor, torch.Tensor]:
                w = wrappers[path]
                dW = w.M.detach().double() @ w.basis.double().T if w.M is not None else w.get_delta_weight()
                return dW, w.base_layer.weight.detach()

            return WeightChanges(wrappers, change)
        return WeightChanges(self.W0, lambda p: (self.targets[p].weight.detach().double() - self.W0[p].double(),
                                                 self.W0[p]))

    def report(self) -> dict[str, dict[str, Any]]:
        facts = {p: {"trained": p in self.trained, "dim": i["dim"], "null_dim": i["null_dim"],
                     "lambda_max_null": i["lambda_max_null"], "lambda_min": i["lambda_min"],
                     "lambda_max": i["lambda_max"]}
                 for p, i in self.info.items()}
        for path, budget in self.budgets.items():
            facts[path].update(leakage_budget=budget.epsilon, budget_active_steps=int(budget.active_steps))
        return {**facts, **(self.others.report() if self.others is not None else {})}

    def unprotected(self) -> dict[str, str]:
        return {TEXT_ENCODER: UNPROTECTED_TEXT_ENCODER} if self.trains_text_encoder else {}

    @torch.no_grad()
    def to_adapter(self) -> None:
        """Projected mode: restore W₀ and express ``W − W₀`` exactly as adapters ``M = (W − W₀) U``."""
        if self.update != "projected":
            return
        deltas = {}
        for path, W0 in self.W0.items():
            weight = self.targets[path].weight
            deltas[path] = weight.detach().to(torch.float64) - W0.to(torch.float64)
            weight.copy_(W0)
            weight.requires_grad_(False)
        self.wrappers = inject_null_space_adapters(self.pipe.unet, self.bases)
        for path, wrapper in self.wrappers.items():
            wrapper.M.copy_((deltas[path] @ wrapper.basis.to(torch.float64)).to(wrapper.M.dtype))  # [out, k]
        self.update = "adapter"
        if self.budgets:  # M's rounding is not W's: certify the adapter that is saved, keeping the step counts
            counts = {p: b.active_steps for p, b in self.budgets.items()}
            self.budgets = self._budgets({p: w.basis for p, w in self.wrappers.items()}, full_weight=False)
            for path, budget in self.budgets.items():
                budget.enforce_(self.wrappers[path].M)
                budget.active_steps = counts[path]

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        if self.others is not None:  # every weight moved in place: the result is a whole UNet, as dreambooth's
            self.pipe.unet.save_pretrained(output_dir / FULL_UNET_DIR)
            return [output_dir / FULL_UNET_DIR]
        self.to_adapter()
        # train_text_encoder tells `nullbooth generate` to take the encoder's LoRA from the LoRA file.
        save_adapter(output_dir, self.pipe.unet, {**info, "nullbooth_update": self.cfg.nullbooth_update,
                                                  "train_text_encoder": self.trains_text_encoder})
        factors = update_factors(unet=self.pipe.unet)
        encoders = {n: getattr(self.pipe, n) for n in encoder_names(self.pipe)} if self.trains_text_encoder else {}
        lora = export_diffusers_lora(output_dir, factors, text_encoders=encoders)
        for name, encoder in encoders.items():
            factors = {**factors, **peft_lora_factors(encoder, name)[0]}  # α = r: scale 1, as the UNet's
        return [output_dir / ADAPTER_WEIGHTS, output_dir / ADAPTER_CONFIG, lora, *self.kohya_export(output_dir, factors)]
