"""Streaming the hooked inputs into float64 second moments: per timestep for q/out, once for the text.

For every ``attn2`` layer and timestep ``t`` the inputs ``x`` of ``to_q`` and ``to_out.0`` add to
``S_t = Σ x xᵀ`` and ``n_t`` (:class:`~nullbooth.stats.moments.SecondMoment`, docs/design.md §2). The inputs of
``to_k``/``to_v`` are the text encodings ``e``, the same for every layer and timestep, so they add once
per batch to one statistic ``Σ e eᵀ`` — after checking that every layer really receives the same tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from nullbooth.errors import NullBoothError
from nullbooth.runs.layout import TEXT_KEY, stat_key, timestep_dirname
from nullbooth.stats.capture import CrossAttentionLayer
from nullbooth.stats.moments import SecondMoment


class Accumulators:
    """Per-(timestep, layer, feature) statistics for q/out and one shared text statistic for k/v.

    ``sink`` is the callback for :func:`~nullbooth.stats.capture.record_inputs`; inside :meth:`batch` it
    files q/out under the timestep in progress and the text encodings (k stands for k and v) once.
    """

    def __init__(self, layers: Sequence[CrossAttentionLayer]) -> None:
        self.layer_names = [layer.name for layer in layers]
        self.by_timestep: dict[int, dict[str, SecondMoment]] = {}
        self.text: SecondMoment | None = None
        self.shapes: dict[str, list[int]] = {}
        self._timestep = [-1]
        self._text_seen = True
        self._text_reference: torch.Tensor | None = None

    @contextmanager
    def batch(self, timestep: list[int], text: bool) -> Iterator[None]:
        """Accumulate one pipeline call: ``timestep[0]`` is the step in progress; ``text``: take the text encodings."""
        self._timestep, self._text_seen = timestep, not text
        try:
            yield
        finally:
            self._timestep = [-1]

    def timestep_stats(self, t: int) -> dict[str, SecondMoment]:
        if t not in self.by_timestep:
            self.by_timestep[t] = {}
        return self.by_timestep[t]

    def sink(self, layer: CrossAttentionLayer, feature: str, x: torch.Tensor) -> None:
        if feature == "k":
            self._add_text(layer, x)
            return
        key = stat_key(layer.name, feature)
        stats = self.timestep_stats(self._timestep[0])
        if key not in stats:
            stats[key] = SecondMoment(x.shape[-1], device=x.device)
        stats[key].add(x)
        self.shapes[key] = list(x.shape)

    def _add_text(self, layer: CrossAttentionLayer, x: torch.Tensor) -> None:
        # The text encodings are the same at every step and layer: take them from the first layer at the
        # batch's first step, and check on that call that every other layer really receives the same tensor.
        first = self.layer_names[0]
        if self._text_seen:
            return
        if layer.name == first:
            self._text_reference = x
            if self.text is None:
                self.text = SecondMoment(x.shape[-1], device=x.device)
            self.text.add(x)
            self.shapes[TEXT_KEY] = list(x.shape)
        elif not torch.equal(x, self._text_reference):
            raise NullBoothError(
                f"{layer.name} receives different encoder_hidden_states than {first}; this UNet does not feed one "
                "text encoding to every cross-attention layer, which k/v statistics rely on"
            )
        if layer.name == self.layer_names[-1]:
            self._text_seen = True

    def state(self) -> dict[str, SecondMoment]:
        """Every statistic under a flat name: ``timestep_XXXX/<layer>/<feature>``, and ``TEXT_KEY``."""
        flat = {f"{timestep_dirname(t)}/{k}": s for t, stats in self.by_timestep.items() for k, s in stats.items()}
        if self.text is not None:
            flat[TEXT_KEY] = self.text
        return flat

    def put(self, name: str, stat: SecondMoment) -> None:
        """Add ``stat`` under a :meth:`state` name (merging into what is already there)."""
        if name == TEXT_KEY:
            self.text = stat if self.text is None else self.text.merge(stat)
            return
        tdir, _, key = name.partition("/")
        stats = self.timestep_stats(int(tdir.removeprefix("timestep_")))
        stats[key] = stat if key not in stats else stats[key].merge(stat)
