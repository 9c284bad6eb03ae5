"""Streaming the hooked inputs into float64 second moments: per timestep for q/out, once for the text.

For every ``attn2`` layer and timestep ``t`` the inputs ``x`` of ``to_q`` and ``to_out.0`` add to
``S_t = Σ x xᵀ`` and ``n_t`` (docs/design.md §2). The inputs of ``to_k``/``to_v`` are the text encodings
``e``, the same for every layer and timestep, so they add once per batch to one float64 ``Σ e eᵀ`` — after
checking that every layer really receives the same tensor.

Memory and precision (issue 14; numbers at 50 steps, benchmarks/results/accumulate.md):

- **Sums are float64, always**; per-timestep sums keep the upper triangle of the symmetric ``S_t``
  (:class:`~nullbooth.stats.moments.PackedSecondMoment`, ``d(d+1)/2`` values): SD 1.5 and SD 2.1 4.96 GB
  instead of 9.9 GB, SDXL 41.0 GB instead of 82 GB. The summed statistic training uses is ``Σ_t S_t`` of
  these, exact in float64 as before.
- **Products** ``XᵀX`` are formed where the features are: float64, or float32 over at most
  :data:`FLOAT32_CHUNK_ROWS` rows per product with each product's triangle added into the float64 sum
  (measured on 768-wide features with real CLIP text statistics, up to 65,536 rows a call: ``|Δλ| ≤ 1.1e-7
  λ_max``, eigenvalues above the null threshold within 1.8e-7 relative — 4.7e-6 on a spectrum conditioned
  1.5e7 — and the same null dimensions; one float32 product over 65,536 rows errs 6–16× more, a float32
  accumulator flushed later up to 2× more). ``accumulation_precision: auto`` takes
  float64 on the CPU and on GPUs with fast float64 (:func:`fast_float64`), float32 elsewhere (consumer GPUs
  run float64 at 1/64 rate).
- **Placement**: on the model's device when the triangles, the finalize-time full sums and a working set
  fit the budget (``accumulator_memory_gb``; default 70 % of the free device memory, or of the available RAM
  on a CPU), else in host RAM (only each product's triangle crosses the bus), else a one-line refusal that
  says what to change (:func:`plan_accumulators`). SD 1.5 needs 5.2 GB: it fits a 24 GB GPU beside its 2 GB
  fp16 model; SDXL needs 42.8 GB: it fits an 80 GB GPU beside its 7 GB model with ≈ 30 GB for activations.
- **Checkpoints** (:mod:`nullbooth.runs.shards`) write the triangles by time (``checkpoint_minutes``), not
  after every batch; whole, not as deltas: every batch adds to every ``(t, layer, feature)`` sum, so a delta
  is as large as the state, and summing deltas on resume would change the float64 order — a resumed run
  keeps ending with the sums of an uninterrupted one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.runs.layout import TEXT_KEY, stat_key, timestep_dirname
from nullbooth.stats.capture import CrossAttentionLayer
from nullbooth.stats.moments import PackedSecondMoment, SecondMoment, packed_size

GB = 1e9
DEFAULT_FRACTION = 0.7  # of free device memory / available RAM: the rest is the model's activations and the OS
FLOAT32_CHUNK_ROWS = 4096  # rows per float32 product: error grows with the rows summed in float32
# GPUs whose float64 runs at ≥ 1/2 of float32 (P100, V100, A100, H100/H200, B200); every other CUDA chip
# (GeForce, RTX workstation, A10/A40/L4/L40, B300) runs it at 1/32–1/64.
FAST_FLOAT64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


@dataclass(frozen=True)
class AccumulatorPlan:
    """Where the per-timestep sums live, how products are formed, and the bytes that takes (recorded in the manifest)."""

    placement: str  # "device" (the model's) or "host" (RAM; products still formed on the device)
    precision: str  # of the products XᵀX: "float64" or "float32" (sums are float64 either way)
    timestep_bytes: int  # the float64 upper triangles of every per-timestep statistic
    summed_bytes: int  # full float64 Σ_t S_t and the text statistic (finalize holds them)
    working_bytes: int  # products and unpacked matrices in flight, on the device
    budget_bytes: int  # what the chosen place allowed
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32

    @property
    def chunk_rows(self) -> int | None:
        return None if self.precision == "float64" else FLOAT32_CHUNK_ROWS

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "chunk_rows": self.chunk_rows, "sums": "float64, per-timestep upper triangles"}


def fast_float64(device: torch.device | str) -> bool:
    """Whether float64 matmuls cost about what float32 ones do on ``device`` (CPUs: 1/2; see the table above)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    if torch.version.hip:  # AMD: the Instinct MI line has full-rate float64, Radeon cards do not
        return "Instinct" in torch.cuda.get_device_name(device) or " MI" in torch.cuda.get_device_name(device)
    return torch.cuda.get_device_capability(device) in FAST_FLOAT64_CAPABILITIES


def free_bytes(device: torch.device | str) -> int:
    """Free memory of a CUDA device, or the RAM available to this process (the CPU, and the host of any device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def _bytes(widths: Sequence[int], steps: int, text_width: int | None) -> tuple[int, int, int]:
    timestep = 8 * steps * sum(packed_size(w) for w in widths)
    summed = 8 * (sum(w * w for w in widths) + (text_width or 0) ** 2)
    widest = max([*widths, text_width or 0, 1])
    working = 8 * (4 * widest * widest + sum(packed_size(w) for w in set(widths)))  # product, unpacks, indices
    return timestep, summed, working


def plan_accumulators(widths: Sequence[int], steps: int, *, text_width: int | None = None, device_budget: float,
                      host_budget: float, on_cpu: bool = False, placement: str = "auto", precision: str = "auto",
                      fast_fp64: bool = True) -> AccumulatorPlan:
    """Choose placement and product precision for per-timestep statistics of input ``widths`` (one per layer and
    q/out feature) over ``steps`` timesteps, within the byte budgets; refuse in one line when nothing fits.

    On a CPU (``on_cpu``) the device is the host: ``host`` means the same memory as ``device``.
    """
    timestep, summed, working = _bytes(widths, steps, text_width)
    on_device, on_host = timestep + summed + working, timestep + summed
    chosen = precision if precision != "auto" else ("float64" if fast_fp64 else "float32")
    why = f"precision {chosen}" + (" (auto: fast float64)" if precision == "auto" and fast_fp64 else
                                   " (auto: float64 is slow here)" if precision == "auto" else "")
    candidates = ["device"] if on_cpu or placement == "device" else ["host"] if placement == "host" else ["device", "host"]
    for where in candidates:
        need, budget = (on_device, device_budget) if where == "device" else (on_host, host_budget)
        if need <= budget:
            return AccumulatorPlan(where, chosen, timestep, summed, working, int(budget),
                                   f"{why}; {where}: needs {need / GB:.2f} GB of {budget / GB:.2f} GB allowed")
    per_step = timestep / max(steps, 1) / GB
    tried = " and ".join(f"the {w} allows {(device_budget if w == 'device' else host_budget) / GB:.1f} GB" for w in candidates)
    raise NullBoothError(
        f"the collection's float64 sums need {on_host / GB:.1f} GB ({steps} steps × {len(widths)} per-timestep "
        f"statistics at {per_step:.2f} GB a step, + {summed / GB:.1f} GB summed) but {tried}; lower "
        "nullbooth.num_denoising_steps, collect fewer cross_attention_layers or collect_features (q/out), or give "
        "more memory: nullbooth.accumulator_memory_gb" + ("" if on_cpu else ", accumulator_device: host"))


def plan_for_collection(nb: Any, layers: Sequence[CrossAttentionLayer], features: Sequence[str], steps: int,
                        device: torch.device | str) -> AccumulatorPlan:
    """:func:`plan_accumulators` for a collection's layers and features on ``device``, from the ``nullbooth`` block."""
    device = torch.device(device)
    widths = [layer.in_features(f) for layer in layers for f in ("q", "out") if f in features]
    text_width = layers[0].in_features("k") if layers and ({"k", "v"} & set(features)) else None
    given = nb.accumulator_memory_gb * GB if nb.accumulator_memory_gb is not None else None
    device_budget = given if given is not None else DEFAULT_FRACTION * free_bytes(device)
    host_budget = given if given is not None and nb.accumulator_device == "host" else \
        DEFAULT_FRACTION * free_bytes("cpu")
    return plan_accumulators(widths, steps, text_width=text_width, device_budget=device_budget,
                             host_budget=host_budget, on_cpu=device.type == "cpu", placement=nb.accumulator_device,
                             precision=nb.accumulation_precision, fast_fp64=fast_float64(device))


class _Unpacked(Mapping[str, SecondMoment]):
    """One timestep's statistics as full :class:`SecondMoment` s, each unpacked when asked for (and not kept)."""

    def __init__(self, stats: Mapping[str, PackedSecondMoment]) -> None:
        self._stats = stats

    def __getitem__(self, key: str) -> SecondMoment:
        return self._stats[key].unpacked()

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)


class Accumulators:
    """Per-(timestep, layer, feature) statistics for q/out and one shared text statistic for k/v.

    ``sink`` is the callback for :func:`~nullbooth.stats.capture.record_inputs`; inside :meth:`batch` it
    files q/out under the timestep in progress and the text encodings (k stands for k and v) once.
    ``plan`` says where the sums live and how products are formed (default: float64, on ``device``).
    """

    def __init__(self, layers: Sequence[CrossAttentionLayer], plan: AccumulatorPlan | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.layer_names = [layer.name for layer in layers]
        self.plan = plan
        self.device = torch.device(device) if plan is None or plan.placement == "device" else torch.device("cpu")
        self._dtype = plan.dtype if plan is not None else torch.float64
        self._chunk_rows = plan.chunk_rows if plan is not None else None
        self.packed: dict[int, dict[str, PackedSecondMoment]] = {}
        self.text: SecondMoment | None = None
        self.shapes: dict[str, list[int]] = {}
        self._timestep = [-1]
        self._text_seen = True
        self._text_reference: torch.Tensor | None = None

    @property
    def by_timestep(self) -> dict[int, Mapping[str, SecondMoment]]:
        """``{t: {layer/feature: statistic}}``, each statistic unpacked to a full ``[d, d]`` sum when read."""
        return {t: _Unpacked(stats) for t, stats in self.packed.items()}

    @contextmanager
    def batch(self, timestep: list[int], text: bool) -> Iterator[None]:
        """Accumulate one pipeline call: ``timestep[0]`` is the step in progress; ``text``: take the text encodings."""
        self._timestep, self._text_seen = timestep, not text
        try:
            yield
        finally:
            self._timestep = [-1]

    def timestep_stats(self, t: int) -> dict[str, PackedSecondMoment]:
        if t not in self.packed:
            self.packed[t] = {}
        return self.packed[t]

    def sink(self, layer: CrossAttentionLayer, feature: str, x: torch.Tensor) -> None:
        if feature == "k":
            self._add_text(layer, x)
            return
        key = stat_key(layer.name, feature)
        stats = self.timestep_stats(self._timestep[0])
        if key not in stats:
            stats[key] = PackedSecondMoment(x.shape[-1], device=self.device)
        stats[key].add(x, dtype=self._dtype, chunk_rows=self._chunk_rows)
        self.shapes[key] = list(x.shape)

    def _add_text(self, layer: CrossAttentionLayer, x: torch.Tensor) -> None:
        # The text encodings are the same at every step and layer: take them from the first layer at the
        # batch's first step, and check on that call that every other layer really receives the same tensor.
        # Their statistic is small and added once per batch: always in float64.
        first = self.layer_names[0]
        if self._text_seen:
            return
        if layer.name == first:
            self._text_reference = x
            if self.text is None:
                self.text = SecondMoment(x.shape[-1], device=self.device)
            self.text.add(x)
            self.shapes[TEXT_KEY] = list(x.shape)
        elif not torch.equal(x, self._text_reference):
            raise NullBoothError(
                f"{layer.name} receives different encoder_hidden_states than {first}; this UNet does not feed one "
                "text encoding to every cross-attention layer, which k/v statistics rely on"
            )
        if layer.name == self.layer_names[-1]:
            self._text_seen = True

    def state(self) -> dict[str, PackedSecondMoment | SecondMoment]:
        """Every statistic under a flat name: ``timestep_XXXX/<layer>/<feature>`` (packed), and ``TEXT_KEY`` (full)."""
        flat: dict[str, PackedSecondMoment | SecondMoment] = {
            f"{timestep_dirname(t)}/{k}": s for t, stats in self.packed.items() for k, s in stats.items()}
        if self.text is not None:
            flat[TEXT_KEY] = self.text
        return flat

    def empty(self, name: str, dim: int) -> PackedSecondMoment | SecondMoment:
        """A zero statistic of width ``dim`` of the kind :meth:`state` holds under ``name``."""
        if name == TEXT_KEY:
            return SecondMoment(dim, device=self.device)
        return PackedSecondMoment(dim, device=self.device)

    def put(self, name: str, stat: PackedSecondMoment | SecondMoment) -> None:
        """Add ``stat`` under a :meth:`state` name (merging into what is already there; full ones are packed)."""
        if name == TEXT_KEY:
            stat = stat.to(self.device) if isinstance(stat, SecondMoment) else stat.unpacked().to(self.device)
            self.text = stat if self.text is None else self.text.merge(stat)
            return
        if isinstance(stat, SecondMoment):
            stat = PackedSecondMoment.from_moment(stat, device=self.device)
        stat.sum = stat.sum.to(self.device)
        tdir, _, key = name.partition("/")
        stats = self.timestep_stats(int(tdir.removeprefix("timestep_")))
        stats[key] = stat if key not in stats else stats[key].merge(stat)
