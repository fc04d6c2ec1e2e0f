"""Progress events: the engine's only channel to whoever watches it (a progress bar, the job table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One step of progress.

    `stage` is one of: load, evaluate_before, the method's stages (teacher, student, fst, anp, ibau, sau),
    evaluate_after, done. `progress` is the share of the whole job done, 0 to 1, so a watcher needs no
    knowledge of the stages.
    Epoch-level events carry `epoch` (1-based) of `epochs`, the epoch's mean `loss` and its `lr`;
    step-level events carry their `step` too, which tells the job table to write them at most once a second;
    anp, which counts iterations rather than epochs, also sends a step event with the mean `loss` and the `lr`
    after each round of 50 iterations; ibau counts its rounds as epochs. The figures of each epoch go to the
    report's history, not here: a watcher shows where the job is.
    """

    stage: str
    progress: float
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    loss: float | None = None
    lr: float | None = None


EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default sink: nobody is watching."""
