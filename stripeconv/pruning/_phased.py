"""The two phases of DAIS and DSA: a search that takes a step on held-out data after every
``alpha_every`` weight steps for ``search_steps`` steps, then fixed channels and fine-tuning."""
from __future__ import annotations

import warnings

from .base import Pruner


class SearchThenFinetune(Pruner):
    """Subclasses set ``phase`` ("search" / "finetune"), ``search_steps``, ``alpha_every`` and
    ``cursor`` (a :class:`~stripeconv.pruning._search.BatchCursor` over ``val_data``), and define
    :meth:`_alpha_step` (one search step) and :meth:`_finalize` (fix the channels, set
    ``phase = "finetune"``)."""

    def after_step(self) -> None:
        self.steps += 1
        if self.phase == "search":
            if self.steps % self.alpha_every == 0:
                self._alpha_step()
            self._after_search_step()
            if self.steps >= self.search_steps:
                self._finalize()
        self._enforce(self._frozen)

    def _after_search_step(self) -> None:
        """Schedules that follow the weight steps of the search (e.g. an annealed temperature)."""

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        if self.epochs is not None and epoch + 1 >= self.epochs and self.phase == "search":
            warnings.warn(f"{type(self).__name__}: the search had not finished after the last epoch (step "
                          f"{self.steps} of {self.search_steps}); fixing the channels now", stacklevel=2)
            self._finalize()

    def _val_batch(self) -> tuple:
        """The next held-out batch, on the model's device."""
        x, y = self.cursor.next()
        device = next(self.model.parameters()).device
        return x.to(device), y.to(device)

    def _alpha_step(self) -> None:
        raise NotImplementedError

    def _finalize(self) -> None:
        raise NotImplementedError

    def prune(self, data=None) -> dict:
        """End the search now and fix the channels; fine-tuning follows. Returns the masks."""
        if self.phase == "search":
            self._finalize()
        return self.masks()

    @property
    def done(self) -> bool:
        return self.phase == "finetune"
