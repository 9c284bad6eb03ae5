"""Accumulator memory per model family, and the error of float32 products against float64 (issue 14, items 2 and 4).

Memory (computed, :func:`nullbooth.runs.accumulate.plan_accumulators`): SD 1.5, SD 2.1 and SDXL at 50 steps —
per-timestep sums as full float64 matrices (before), full float32, float64 upper triangles (the design), the
summed statistics, and whether the plan fits a 24 / 80 GB GPU beside the fp16 model with the default budget.

Precision (measured on the CPU): features with the second moment of real CLIP ViT-L/14 text encodings
(``clip_vit_l14_text_covariance.npy``, 768 wide) — and, as a stress case, the same eigenvectors with the
spectrum squared (condition number ≈ 2·10⁷) — rounded to float32 (a float32 model) or float16 (a half-precision
model on a GPU). ``S = Σ XᵀX`` in float64 is the reference; against it: products in float32 over one chunk of
``rows`` rows (a hook call's rows: 2 × batch × tokens), chunked into 4096 rows, and 8 calls summed in float64
(the design) or in a float32 accumulator flushed to float64 once (the rejected alternative). Reported:
``max |Δλ|/λ_max``, the largest relative error of an eigenvalue above the null threshold, the null dimension
and ``‖P₃₂ − P₆₄‖₂`` of the null-space projector (relative mode).

    python benchmarks/bench_accumulate.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIP = ROOT / "src" / "nullbooth" / "data" / "clip_vit_l14_text_covariance.npy"
GB = 1e9
STEPS = 50

# attn2 input widths (q and out alike) per layer, the text width and the fp16 pipeline's weights in GB
# (public configs: SD 1.5 / SD 2.1 have 16 attn2 layers, SDXL 70).
FAMILIES = {
    "SD 1.5": {"layers": [320] * 5 + [640] * 5 + [1280] * 6, "text": 768, "model_gb": 2.1, "card_gb": 24},
    "SD 2.1": {"layers": [320] * 5 + [640] * 5 + [1280] * 6, "text": 1024, "model_gb": 2.6, "card_gb": 24},
    "SDXL": {"layers": [640] * 10 + [1280] * 60, "text": 2048, "model_gb": 6.9, "card_gb": 80},
}
CUDA_CONTEXT_GB = 0.5


def memory_table() -> list[dict]:
    from nullbooth.runs.accumulate import DEFAULT_FRACTION, plan_accumulators
    from nullbooth.stats.moments import packed_size

    rows = []
    for name, fam in FAMILIES.items():
        widths = [w for w in fam["layers"] for _ in ("q", "out")]
        full64 = 8 * STEPS * sum(w * w for w in widths)
        budget = DEFAULT_FRACTION * (fam["card_gb"] - fam["model_gb"] - CUDA_CONTEXT_GB) * GB
        plan = plan_accumulators(widths, STEPS, text_width=fam["text"], device_budget=budget, host_budget=0,
                                 fast_fp64=False)
        rows.append({
            "family": name, "attn2_layers": len(fam["layers"]), "steps": STEPS,
            "per_timestep_full_float64_gb": full64 / GB, "per_timestep_full_float32_gb": full64 / 2 / GB,
            "per_timestep_packed_float64_gb": 8 * STEPS * sum(packed_size(w) for w in widths) / GB,
            "summed_float64_gb": plan.summed_bytes / GB, "working_gb": plan.working_bytes / GB,
            "device_need_gb": (plan.timestep_bytes + plan.summed_bytes + plan.working_bytes) / GB,
            "card_gb": fam["card_gb"], "model_gb": fam["model_gb"], "default_budget_gb": budget / GB,
            "placement": plan.placement, "precision_on_consumer_gpu": plan.precision,
        })
    return rows


@functools.lru_cache(maxsize=1)
def clip_spectrum() -> tuple[torch.Tensor, torch.Tensor]:
    C = torch.from_numpy(np.load(CLIP)).double()
    return torch.linalg.eigh((C + C.T) / 2)


def features(n: int, spectrum_power: float, seed: int) -> torch.Tensor:
    """``n`` rows whose second moment has the CLIP matrix's eigenvectors and its eigenvalues ** ``spectrum_power``
    (float32; the caller rounds them to the model's dtype and the float64 reference uses the rounded rows)."""
    lam, V = clip_spectrum()
    lam = lam.clamp_min(0) ** spectrum_power
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, lam.numel(), generator=g)
    return (z * lam.sqrt().float()) @ V.T.float()  # [n, d], E[xxᵀ] = V diag(λ) Vᵀ


def compare(S: torch.Tensor, ref: torch.Tensor, rel_threshold: float) -> dict:
    from nullbooth.stats.nullspace import null_dimension

    lam_ref, V_ref = torch.linalg.eigh(ref)
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    top = float(lam_ref[-1])
    k_ref = null_dimension(lam_ref, "relative", rel_threshold)
    k = null_dimension(lam, "relative", rel_threshold)
    kept = lam_ref > rel_threshold * top
    P_ref, P = V_ref[:, :k_ref] @ V_ref[:, :k_ref].T, V[:, :k] @ V[:, :k].T
    return {
        "frobenius_rel": float((S - ref).norm() / ref.norm()),
        "max_abs_eig_err_over_lambda_max": float((lam - lam_ref).abs().max() / top),
        "max_rel_eig_err_above_threshold": float(((lam - lam_ref).abs()[kept] / lam_ref[kept]).max()),
        "max_rel_eig_err_all": float(((lam - lam_ref).abs() / lam_ref.abs().clamp_min(1e-300)).max()),
        "null_dim_float64": k_ref, "null_dim": k,
        "projector_diff_2norm": float(torch.linalg.matrix_norm(P - P_ref, ord=2)),
    }


CASES = [  # (spectrum power, label, relative null threshold, {feature dtype: rows per call})
    (1.0, "CLIP text (real spectrum, cond 3.9e3)", 1e-3,
     {torch.float16: [1024, 4096, 16384, 65536], torch.float32: [16384, 65536]}),
    (2.0, "CLIP eigenvectors, spectrum squared (cond 1.5e7)", 1e-5, {torch.float16: [16384], torch.float32: [16384]}),
]
CALLS = 8  # hook calls summed into one statistic: float64 sums against one float32 accumulator


def precision(quick: bool) -> list[dict]:
    from nullbooth.stats.moments import gram, gram_chunks

    out = []
    for power, label, threshold, sizes in CASES:
        for dtype, rows in sizes.items():
            row = {"features": label, "feature_dtype": str(dtype).removeprefix("torch.")}
            for n in rows[:2] if quick else rows:
                x = features(n, power, seed=n).to(dtype)
                ref = gram(x, torch.float64)
                cases = {"float32, one product": gram(x, torch.float32),
                         "float32, 4096-row chunks": gram(x, torch.float32, 4096)}
                for name, S in cases.items():
                    out.append({**row, "rows": n, "calls": 1, "scheme": name, **compare(S, ref, threshold)})
            # CALLS calls of 4096 rows: the design (each product's float32 sum added into float64) against a float32
            # accumulator over the calls flushed into float64 once.
            xs = [features(4096, power, seed=100 + i).to(dtype) for i in range(CALLS)]
            ref = sum(gram(x, torch.float64) for x in xs)
            design = sum(gram(x, torch.float32) for x in xs)
            acc32 = torch.zeros_like(ref, dtype=torch.float32)
            for x in xs:
                for part in gram_chunks(x, torch.float32):
                    acc32 += part
            for name, S in {"float32 products, float64 sums": design,
                            "float32 accumulator, one flush": acc32.double()}.items():
                out.append({**row, "rows": 4096, "calls": CALLS, "scheme": name, **compare(S, ref, threshold)})
    return out


def timing(d: int = 1280, n: int = 16384, repeats: int = 3) -> dict:
    from nullbooth.stats.moments import gram

    x = torch.randn(n, d)
    out = {}
    for dtype in (torch.float64, torch.float32):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            gram(x, dtype)
            runs.append(time.perf_counter() - start)
        out[str(dtype).removeprefix("torch.")] = min(runs)
    return {"width": d, "rows": n, "threads": torch.get_num_threads(), "seconds": out}


def markdown(result: dict) -> str:
    lines = ["# Accumulator memory and precision", "",
             f"{result['machine']}. Memory is computed; errors and times are measured on the CPU.", "",
             f"## Memory per family at {STEPS} steps (GB)", "",
             "Per-timestep sums of q and out of every attn2 layer; the design keeps them as float64 upper triangles. "
             "The device need adds the full float64 summed statistics (finalize) and a working set. Budget: the "
             "default 70 % of what the card has free beside the fp16 model (and 0.5 GB of CUDA context).", "",
             "| family | attn2 | full float64 (before) | full float32 | **float64 triangles** | summed float64 | "
             "device need | card | model | default budget | placement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["memory"]:
        lines.append(f"| {r['family']} | {r['attn2_layers']} | {r['per_timestep_full_float64_gb']:.2f} | "
                     f"{r['per_timestep_full_float32_gb']:.2f} | **{r['per_timestep_packed_float64_gb']:.2f}** | "
                     f"{r['summed_float64_gb']:.3f} | {r['device_need_gb']:.2f} | {r['card_gb']} | {r['model_gb']} | "
                     f"{r['default_budget_gb']:.1f} | {r['placement']} |")
    t = result["timing"]
    lines += ["", "## Precision of float32 products against float64", "",
              "Relative null threshold 1e-3 (CLIP) / 1e-5 (stress); Δλ against the float64 eigenvalues of the same "
              "rounded features.", "",
              "| features | dtype | rows × calls | scheme | ‖ΔS‖/‖S‖ | max Δλ/λ_max | max Δλ/λ above thr. | "
              "null dim 64 → 32 | ‖ΔP‖₂ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["precision"]:
        lines.append(f"| {r['features']} | {r['feature_dtype']} | {r['rows']} × {r['calls']} | {r['scheme']} | "
                     f"{r['frobenius_rel']:.1e} | {r['max_abs_eig_err_over_lambda_max']:.1e} | "
                     f"{r['max_rel_eig_err_above_threshold']:.1e} | {r['null_dim_float64']} → {r['null_dim']} | "
                     f"{r['projector_diff_2norm']:.1e} |")
    s = t["seconds"]
    lines += ["", f"CPU time of one `XᵀX` ({t['rows']} × {t['width']}, {t['threads']} thread(s)): float64 "
              f"{s['float64']:.3f} s, float32 {s['float32']:.3f} s ({s['float64'] / s['float32']:.1f}×).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "memory": memory_table(), "precision": precision(args.quick), "timing": timing()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "accumulate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "accumulate.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
