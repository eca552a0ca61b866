"""The batch-source interface and the built-in synthetic source."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor


class ActivationSource:
    """A deterministic, restartable stream of batches [batch_size, d]."""

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


class SyntheticSource(ActivationSource):
    """Batches of the built-in generator: batch i is a pure function of (seed, i)."""

    INIT_INDEX = 10**9  # batches for initialisation and evaluation never overlap training ones
    EVAL_INDEX = 2 * 10**9

    def __init__(self, data, batch_size: int, init_tokens: int = 16_384):
        self.data = data
        self.batch_size = batch_size
        self.init_tokens = init_tokens

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        return self.data.stream(self.batch_size, start=start)

    def sample_for_init(self) -> Tensor:
        return self.data.batch(self.INIT_INDEX, self.init_tokens).x

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for i in range(math.ceil(n_tokens / batch_size)):
            batch = self.data.batch(self.EVAL_INDEX + i, min(batch_size, n_tokens - i * batch_size))
            yield batch.x, batch.coefficients
