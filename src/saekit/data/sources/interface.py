"""The batch-source interface: what the trainer and the evaluation read batches from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class StreamSettings:
    """What a run tells its source (the run config's fields a source reads)."""

    batch_size: int
    """Tokens per batch."""
    seed: int
    """Seed of the stream: batch order, shuffling, synthetic draws."""
    eval_tokens: int
    """Tokens of held-out data the run evaluates on."""
    device: str = "cpu"
    """Torch device of a model a source runs."""


class ActivationSource:
    """A deterministic, restartable stream of batches [batch_size, d]."""

    measured_width: int | None = None
    """The width of its batches when the source found it (a cache's manifest, a model's hook),
    else None (the config states it); the run compares it with its SAEs' widths."""
    description: str = "the data"
    """Where the activations come from, for messages (e.g. "hook h.1 of model gpt2")."""

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        raise NotImplementedError

    def sample_for_init(self) -> Tensor:
        """Tokens for the scale and b_dec estimates."""
        raise NotImplementedError

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Held-out (x, true coefficients or None) batches covering ``n_tokens``."""
        raise NotImplementedError

    def known_features(self) -> Any:
        """The built-in generator behind the batches (saekit.data.synthetic.generator:
        ``directions``, ``parent_of``, ``true_l0``, ``cfg.kind``), whose recovery and absorption
        the evaluation reports; None for other data."""
        return None
