"""Progress events: the engine's only channel to whoever watches it (a progress bar, the job table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One step of progress.

    `stage` is one of: load, evaluate_before, the method's stages (teacher, student, fst, anp, ibau, sau),
    evaluate_after, done. `progress` is the share of the whole job done, 0 to 1, so a watcher needs no
    knowledge of the stages.
    Epoch-level events carry `epoch` (1-based) of `epochs`, the epoch's mean `loss` and its `lr`;
    step-level events carry `step` of `steps`; anp, which counts iterations rather than epochs, also sends a
    step event with the mean `loss` and the `lr` after each round of 50 iterations; ibau counts its rounds as
    epochs; evaluation events carry `metrics`.
    """

    stage: str
    progress: float
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default sink: nobody is watching."""
