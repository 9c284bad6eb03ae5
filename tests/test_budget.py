"""The certified leakage budget (``nullbooth.leakage_budget``, :mod:`nullbooth.methods.budget`).

- eq. 4's projection is the Euclidean projection: KKT (``M − P = μ P G``, ``μ ≥ 0``, on the boundary) and
  no sampled feasible point is closer;
- property test: random prior statistics (spectra over six decades), random gradients, AdamW, every threshold
  mode, both update modes — after every step the leakage recomputed here in float64 from the stored parameters
  is ≤ ε (1 + 1e-9); with ε large every step equals the unbudgeted one bit for bit;
- end to end on tiny-sd: the report certifies ε, a resumed budgeted run equals an uninterrupted one, the soft
  penalty lowers the leakage, and the LoRA a budgeted CLI run exports, loaded by plain diffusers, keeps the k/v
  leakage on the preserved prompts' own CFG encodings ≤ ε (1 + 1e-6).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import budget_world, budgeted_config

from nullbooth.cli.main import main
from nullbooth.config import config_from_dict
from nullbooth.methods.budget import LeakageBudget, project_onto_ellipsoid, shrink_multiplier
from nullbooth.methods.leakage import project_update_, relative_leakage
from nullbooth.models import load_pipeline
from nullbooth.stats.nullspace import null_space
from nullbooth.training.loop import train

EPS_CERT = 1e-9  # certified: ≤ ε (1 + 1e-9), recomputed in float64


def random_prior(d: int, gen: torch.Generator, decades: float = 6.0) -> torch.Tensor:
    """A PSD second moment with eigenvalues log-uniform over ``decades`` (like text features: a few huge, many tiny)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = 10 ** (-decades * torch.rand(d, generator=gen, dtype=torch.float64))
    return (Q * lam) @ Q.T


def ellipsoid(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    G = random_prior(d, gen, decades=4)
    lam, Q = torch.linalg.eigh(G)
    return G, lam.clamp_min(0), Q


# --------------------------------------------------------------------------- the projection


@pytest.mark.parametrize("seed", range(5))
def test_projection_satisfies_kkt_and_no_feasible_point_is_closer(seed):
    gen = torch.Generator().manual_seed(seed)
    G, lam, Q = ellipsoid(7, gen)
    M = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    r2 = float(((M @ G) * M).sum()) * 0.01  # the point leaks 10× the radius
    P = project_onto_ellipsoid(M, lam, Q, r2)
    assert float(((P @ G) * P).sum()) == pytest.approx(r2, rel=1e-9)  # on the boundary
    # Stationarity: M − P = μ P G with one μ ≥ 0 (gradient of tr(P G Pᵀ) is 2 P G).
    PG = P @ G
    mu = float((M - P).flatten() @ PG.flatten() / (PG.flatten() @ PG.flatten()))
    assert mu > 0 and torch.allclose(M - P, mu * PG, atol=1e-9 * float(M.abs().max()))
    # No sampled point of the ellipsoid is closer to M.
    Y = torch.randn(2000, 4, 7, generator=gen, dtype=torch.float64)
    scale = torch.einsum("nij,jk,nik->n", Y, G, Y).sqrt() / math.sqrt(r2)
    Y = Y / scale.clamp_min(1.0)[:, None, None] * torch.rand(2000, 1, 1, generator=gen, dtype=torch.float64)
    Y = torch.cat([Y, P + 1e-3 * torch.randn(200, 4, 7, generator=gen, dtype=torch.float64)])
    inside = torch.einsum("nij,jk,nik->n", Y, G, Y) <= r2
    assert float((Y[inside] - M).flatten(1).norm(dim=1).min()) >= float((P - M).norm()) * (1 - 1e-12)


def test_inside_points_are_untouched_and_zero_radius_keeps_only_unused_directions():
    gen = torch.Generator().manual_seed(1)
    G, lam, Q = ellipsoid(5, gen)
    M = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    assert project_onto_ellipsoid(M, lam, Q, float(((M @ G) * M).sum()) * 1.01) is M
    assert shrink_multiplier(lam, torch.ones(5, dtype=torch.float64), 0.0) == math.inf
    lam0 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    P = project_onto_ellipsoid(torch.ones(2, 3, dtype=torch.float64), lam0, torch.eye(3, dtype=torch.float64), 0.0)
    assert P.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


# --------------------------------------------------------------------------- the guarantee, step by step

MODES = [("absolute", None), ("relative", 1e-3), ("energy", 0.999), ("rank", 5), ("percentile", 60.0), ("rank", 0)]


def run_steps(mode: str, threshold: float | None, update: str, epsilon: float | None, seed: int, steps: int = 12):
    """AdamW on random gradients; after each step NullBooth's after_step (P, then the budget). Yields ΔW (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d, out = 16, 6
    S = random_prior(d, gen)
    W0 = torch.randn(out, d, generator=gen)
    lam = torch.linalg.eigvalsh(S)
    if threshold is None:  # absolute: between two eigenvalues, so both spaces are non-empty
        threshold = float(lam[d // 2])
    basis = null_space(S, mode, threshold).basis  # float64 [d, k]
    if update == "adapter":
        U = basis.float()  # the adapter's buffer; ΔW = M Uᵀ as the model applies it
        param = torch.nn.Parameter(torch.zeros(out, U.shape[1]))
        budget = LeakageBudget(epsilon, S, W0, U) if epsilon else None
    else:
        P = (basis @ basis.T).float()
        param = torch.nn.Parameter(W0.clone())
        budget = LeakageBudget(epsilon, S, W0, basis, full_weight=True) if epsilon else None
    opt = torch.optim.AdamW([param], lr=0.05, weight_decay=1e-2)
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=gen)
        opt.step()
        with torch.no_grad():
            if update == "projected":
                project_update_(param, W0, P)
            if budget is not None:
                budget.enforce_(param, None if update == "adapter" else W0)
        dW = param.detach().double() @ U.double().T if update == "adapter" else param.detach().double() - W0.double()
        yield dW, W0, S, budget


@pytest.mark.parametrize("update", ["adapter", "projected"])
@pytest.mark.parametrize("mode,threshold", MODES)
def test_every_step_is_within_the_budget(mode, threshold, update):
    for seed in range(3):
        # ε a fraction of where the unbudgeted walk ends, so the wall is always met (spectra differ by mode).
        free = [relative_leakage(dW, W0, S) for dW, W0, S, _ in run_steps(mode, threshold, update, None, seed)]
        epsilon = (0.1, 0.3, 0.6)[seed] * free[-1]
        active = 0
        for dW, W0, S, budget in run_steps(mode, threshold, update, epsilon, seed):
            leak = relative_leakage(dW, W0, S)  # independent float64 recomputation (eq. 2)
            assert leak <= epsilon * (1 + EPS_CERT), f"{mode}/{update}: leakage {leak:.12g} > ε {epsilon}"
            if int(budget.active_steps) > active:  # a projected step ends on the wall, not short of it
                assert leak >= epsilon * (1 - 1e-3), f"{mode}/{update}: projected to {leak:.12g}, ε {epsilon}"
            active = int(budget.active_steps)
        assert active > 0, "the random walk should hit the wall"


@pytest.mark.parametrize("update", ["adapter", "projected"])
@pytest.mark.parametrize("mode,threshold", MODES[:3])
def test_a_large_budget_changes_nothing(mode, threshold, update):
    free = [dW for dW, *_ in run_steps(mode, threshold, update, None, seed=7)]
    walled = list(run_steps(mode, threshold, update, 1e6, seed=7))
    assert all(torch.equal(a, b[0]) for a, b in zip(free, walled))
    assert int(walled[-1][3].active_steps) == 0


# --------------------------------------------------------------------------- end to end on tiny-sd

PRIOR = ["a red circle on the left", "a small blue square", "a photo of a dog", "a green triangle at the top"]
EPSILON = 0.05


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return budget_world(tmp_path_factory.mktemp("budget"), PRIOR)


def budget_config(world, out: str, **top) -> dict:
    return budgeted_config(world, out, epsilon=EPSILON, learning_rate=3e-2, **top)


@pytest.mark.parametrize("update", ["adapter", "projected"])
def test_training_report_certifies_the_budget(world, update):
    cfg = config_from_dict(budget_config(world, f"cert-{update}", nullbooth_update=update))
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    s = report["summary"]
    assert s["leakage_budget"] == EPSILON and s["budget_certified"] and s["budget_active_weights"] > 0
    rows = [r for r in report["weights"] if r.get("trained")]
    assert rows and all(r["leak_preserved"] <= EPSILON * (1 + EPS_CERT) for r in rows)
    assert max(r["leak_preserved"] for r in rows) > EPSILON * 0.99  # the wall was reached, not trivially far


def test_soft_penalty_lowers_the_leakage(world):
    leaks = []
    for gamma in (0.0, 1e3):
        data = budget_config(world, f"soft-{gamma:g}", nullbooth={"leakage_budget": None, "leakage_penalty": gamma})
        report = train(config_from_dict(data), pipe=load_pipeline("tiny-sd"), progress=False)
        leaks.append(report["summary"]["max_leak_preserved"])
    assert leaks[1] < 0.5 * leaks[0]


@pytest.mark.slow
def test_budgeted_resume_equals_an_uninterrupted_run(world):
    from safetensors.torch import load_file

    straight = train(config_from_dict(budget_config(world, "straight", checkpointing_steps=2)),
                     pipe=load_pipeline("tiny-sd"), progress=False)
    half = config_from_dict(budget_config(world, "resumed", checkpointing_steps=2, max_train_steps=2))
    train(half, pipe=load_pipeline("tiny-sd"), progress=False)
    resumed = train(config_from_dict(budget_config(world, "resumed", checkpointing_steps=2,
                                                   resume_from_checkpoint="latest")),
                    pipe=load_pipeline("tiny-sd"), progress=False)
    a = load_file(str(Path(straight["files"][0])))
    b = load_file(str(Path(resumed["files"][0])))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = {r["weight"]: r.get("budget_active_steps") for r in straight["weights"]}
    assert steps == {r["weight"]: r.get("budget_active_steps") for r in resumed["weights"]}


@pytest.mark.slow
def test_cli_budgeted_lora_in_plain_diffusers_keeps_kv_leakage_within_budget(world, capsys):
    from diffusers import StableDiffusionPipeline

    from nullbooth.models import resolve_model_path

    config = world["tmp"] / "budget.yaml"
    config.write_text(yaml.safe_dump(budget_config(world, "cli")))
    assert main(["train", "--config", str(config)]) == 0
    assert "leakage budget ε = 0.05 on the prior features: certified" in capsys.readouterr().out
    out = world["tmp"] / "cli"
    report = json.loads((out / "train_report.json").read_text())
    assert report["summary"]["budget_certified"]

    pipe = StableDiffusionPipeline.from_pretrained(str(resolve_model_path("tiny-sd")), safety_checker=None)
    with torch.no_grad():  # the preserved prompts' encodings as the pipeline feeds attn2: prompt and "" branches
        positive, negative = pipe.encode_prompt(PRIOR, "cpu", 1, True, [""] * len(PRIOR))
        X = torch.cat([negative, positive]).double()  # [2n, 77, d]
    base = {n: m.weight.detach().double().clone() for n, m in pipe.unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))}
    pipe.load_lora_weights(str(out))
    pipe.unet.double()
    leaks = []
    with torch.no_grad():
        for name, W in base.items():
            module = pipe.unet.get_submodule(name)
            delta = module(X) - X @ W.T  # what the loaded LoRA adds, in float64
            leaks.append(float(delta.square().sum().sqrt() / (X @ W.T).square().sum().sqrt()))
    assert len(leaks) == len(base) > 0
    assert max(leaks) <= EPSILON * (1 + 1e-6), f"k/v leakage {max(leaks):.9g} > ε {EPSILON}"
    assert max(leaks) > 0
