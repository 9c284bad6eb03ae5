"""The ``nullbooth`` method: ΔW confined to the null space of the prior-knowledge features (docs/design.md §2).

Two ways to train the same family of updates: ``adapter`` trains ``M`` in ``ΔW = M Uᵀ`` (exact,
default); ``projected`` trains the full weight and projects the whole optimizer update after each
step, ``W ← W₀ + (W − W₀) P``. Both are saved as the same adapter and its diffusers LoRA export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from nullbooth.methods.adapter_files import bases_from_run, save_adapter
from nullbooth.methods.adapters import inject_null_space_adapters, null_space_adapters
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.leakage import project_update_
from nullbooth.methods.lora_export import export_diffusers_lora
from nullbooth.stats.nullspace import empty_fix


class NullBooth(Method):
    """ΔW in the null space of the prior-knowledge features of every protected weight (docs/design.md §2).

    ``adapter``: ``W' = W + M Uᵀ`` with ``U`` from the run's timestep-summed statistics, ``M`` trained.
    ``projected``: ``W`` trained, then ``W ← W₀ + (W − W₀) P`` after each step (``P = U Uᵀ``), which
    projects Adam's whole update including weight decay; the result is saved as the same adapter,
    ``M = (W − W₀) U``, since ``W − W₀ = (W − W₀) U Uᵀ``.
    """

    name = "nullbooth"

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        if stats_run is None:
            raise NullBoothError("method 'nullbooth' needs a statistics run; set nullbooth.original_knowledge_prompts "
                                 "or nullbooth.stats_run")
        self.stats_run = Path(stats_run)
        nb = self.cfg.nullbooth
        # Every check on the run happens before the model is touched.
        bases, self.info = bases_from_run(stats_run, self.layers(pipe), self.features(), nb.nullspace_mode,
                                          nb.nullspace_threshold)
        self.bases = {p: U for p, U in bases.items() if U.shape[1] > 0}
        if not self.bases:
            spectra = [(i["lambda_min"], i["lambda_max"]) for i in self.info.values()]
            raise NullBoothError(
                f"every null space of {stats_run} is empty under nullspace_mode '{nb.nullspace_mode}' threshold "
                f"{nb.nullspace_threshold:g}: nothing can be trained; {empty_fix(nb.nullspace_mode, spectra)}"
            )
        self._freeze(pipe)
        self.update = self.cfg.nullbooth_update
        if self.update == "adapter":
            wrappers = inject_null_space_adapters(pipe.unet, self.bases)
            return [{"params": [w.M for w in wrappers.values()], "lr": self.lr}]
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
        return [{"params": [self.targets[p].weight for p in self.bases], "lr": self.lr}]

    @torch.no_grad()
    def after_step(self) -> None:
        if self.update == "projected":
            for path, W0 in self.W0.items():
                # Project the cumulative update from W₀: equal to projecting each step's update (earlier
                # ones are already in the null space, P is idempotent) without accumulating round-off.
                project_update_(self.targets[path].weight, W0, self.P[path])

    def weight_changes(self) -> WeightChanges:
        if self.update == "adapter":
            return {p: (w.get_delta_weight().detach(), w.base_layer.weight.detach())
                    for p, w in null_space_adapters(self.pipe.unet).items()}
        return {p: (self.targets[p].weight.detach() - W0, W0) for p, W0 in self.W0.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        return {p: {"trained": p in self.bases, "dim": i["dim"], "null_dim": i["null_dim"],
                    "lambda_max_null": i["lambda_max_null"], "lambda_min": i["lambda_min"],
                    "lambda_max": i["lambda_max"]}
                for p, i in self.info.items()}

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
        wrappers = inject_null_space_adapters(self.pipe.unet, self.bases)
        for path, wrapper in wrappers.items():
            wrapper.M.copy_((deltas[path] @ wrapper.basis.to(torch.float64)).to(wrapper.M.dtype))  # [out, k]
        self.update = "adapter"

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        self.to_adapter()
        save_adapter(output_dir, self.pipe.unet, {**info, "nullbooth_update": self.cfg.nullbooth_update})
        lora = export_diffusers_lora(output_dir, unet=self.pipe.unet)
        return [output_dir / ADAPTER_WEIGHTS, output_dir / ADAPTER_CONFIG, lora]
