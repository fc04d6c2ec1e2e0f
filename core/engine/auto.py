"""`method: auto`: run several defenses and keep the one that clean data says is best.

The user usually does not know the trigger, so the choice may use clean data only. A tenth of the clean
training images (stratified) is set aside as a selection set; every candidate method cleans its own copy of
the suspect model on the other nine tenths and is measured on the selection set by its clean accuracy, which
must stay within `auto_budget` points of the suspect's. Of the candidates within the budget the first in
`auto_candidates` order wins: the order is the user's (by default the project's) ranking of how surely each
method erases a backdoor, and the budget says how much accuracy that surety may cost. When no candidate is
within the budget, the most accurate one is kept (the first of them, on a tie), and the report says so: the
budget is spent, and every point a less accurate candidate reads under it is one more the user loses.

A candidate that cannot clean the model at all (`methods.unsuitable`: `fst` where there is no linear
classifier layer, `anp` where there is no BatchNorm) is left out and listed as skipped, with the reason.
Candidates run in that order while the job's time allows: when the job has a time limit (the service's
`NAD_JOB_TIME_LIMIT`), a candidate whose estimated time does not fit in what is left is skipped, and the
choice is made among those that ran, so a job near its limit ends with a cleansed model instead of failing.
The first candidate always runs, as does any while nothing before it has trained. The estimate is the
candidate's cost in epochs of fine-tuning (`methods.stages`) times the seconds each such epoch took the
candidates before it, with a margin of `ESTIMATE_MARGIN` for the weights' roughness. The estimate can still
fall short (a sau retry adds epochs), so a candidate that starts after another has finished is stopped before
an epoch that would end too late to measure it (`Cutoff`), and is listed with the skipped ones: the job's own
limit would otherwise fail the job and lose the candidates that finished.

No clean-data signal ranks the candidates by erasure, because none we measured told erasure apart: the
feature shift from the suspect (FST's observation) was largest for a candidate that kept the backdoor on two
of the five models measured (docs/engine.md, "Choosing automatically"). Some signals only say a candidate
failed, and give it a `warning`: a method's own (sau's shared loss saturated at the end of its last run, or in
most of its epochs), or, where the suspect showed the resampling sign, the cleansed model still showing it
(core/engine/resampling.py). Such a candidate is set aside while any other ran.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.engine.data import stratified_split
from core.engine.errors import Cancelled, InputError
from core.engine.methods import Defended, Run, defend, stages, unsuitable
from core.engine.metrics import classify

SELECTION_FRACTION = 0.1
# The stage weights are rough, so the estimate gets a margin. They count epochs of fine-tuning, and a NAD student
# epoch costs more than one: in one default job on CIFAR-10 (2 CPU cores), nad took 27.5 s per unit and sau 11,
# so after nad the estimate for sau was about three times what sau took (safe, but it skips sau sooner than
# it must). A candidate that takes longer than estimated is stopped by its `Cutoff`.
ESTIMATE_MARGIN = 1.3


@dataclass(frozen=True)
class Choice:
    defended: Defended
    report: dict[str, Any]
    metrics: dict[str, Any]  # the chosen model's, from `measure`: the job's "after"


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run) -> torch.Tensor:
    """Which of `images` the model classifies right, in evaluation mode (a boolean per image)."""
    return classify(model, images, run.normalize, run.execution) == labels


def percent(right: torch.Tensor) -> float:
    return 100.0 * float(right.float().mean())


def against_suspect(right: torch.Tensor, suspect_right: torch.Tensor) -> dict[str, Any]:
    """A candidate's selection accuracy and how it differs from the suspect's, image by image.

    The budget compares two accuracies on the same few hundred images, so the gap is noisy: it rests on the
    images one model gets right and the other wrong. `selection_lost` counts those the suspect got right,
    `selection_gained` the others, and `selection_gap_se` is the standard error (points) of the paired gap they
    give. The choice does not use them; they say how far a user (or a later rule) can trust it."""
    images = len(right)
    lost = int((suspect_right & ~right).sum())
    gained = int((right & ~suspect_right).sum())
    se = 100.0 * math.sqrt(lost + gained - (gained - lost) ** 2 / images) / images
    return {"selection_acc": round(percent(right), 2), "selection_lost": lost, "selection_gained": gained,
            "selection_gap_se": round(se, 2)}


def pick(rows: list[dict[str, Any]], suspect_acc: float, budget: float) -> tuple[int, str]:
    """The index of the candidate to keep among `rows` (each with method and selection_acc, in preference
    order), and why: the first within `budget` points of `suspect_acc`. When none is within it, the most
    accurate candidate. The suspect may have trained on the clean images (it scores 5 to 10 points higher on
    them than on unseen ones), so none may be within the budget of it; the most accurate candidate has then
    already lost what it lost, and an earlier one that reads a point or two under it loses that much more on
    unseen images too. Measuring the budget from the most accurate, as `auto` did until 2026-12-05, added the
    two: 4.07 points under before on our patch model, 4.9 on our GPU-trained warp (docs/results.md).
    Candidates with a `warning` (their own signals say the backdoor may have survived) are set aside while
    any other ran."""
    trusted = [i for i, row in enumerate(rows) if not row.get("warning")] or list(range(len(rows)))
    aside = "".join(f"; {rows[i]['method']} set aside: {rows[i]['warning']}" for i in range(len(rows))
                    if i not in trusted)
    eligible = _within(rows, trusted, suspect_acc, budget)
    if eligible:
        best = eligible[0]
        return best, (f"{rows[best]['method']} is the first candidate that kept clean accuracy on the selection "
                      f"set within {budget} points of the suspect's {suspect_acc:.2f} %{aside}")
    top = max(rows[i]["selection_acc"] for i in trusted)
    best = _within(rows, trusted, top, 0.0)[0]
    return best, (f"no candidate kept clean accuracy within {budget} points of the suspect's {suspect_acc:.2f} %; "
                  f"{rows[best]['method']} is the most accurate ({top:.2f} %){aside}")


def _within(rows: list[dict[str, Any]], indices: list[int], acc: float, budget: float) -> list[int]:
    return [i for i in indices if rows[i]["selection_acc"] >= acc - budget]


def choose(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run,
           measure: Callable[[nn.Module], dict[str, Any]]) -> Choice:
    """Run the candidates of `run.params.auto_candidates` that the job's time allows, each on a copy of
    `model`, and return the chosen one.

    `measure` gives each candidate's metrics on the job's evaluation set (its ACC, and ASR when the attack is
    known). They go into the report, so that a user who knows the attack sees what every candidate did, and
    play no part in the choice."""
    params = run.params
    keep, held = (torch.from_numpy(index).to(images.device)
                  for index in stratified_split(labels.cpu().numpy(), SELECTION_FRACTION, params.seed))
    if not len(held):
        raise InputError("auto sets a tenth of the clean images aside to choose among its candidates, and every "
                         "class of this clean data has a single image; give more clean images, or choose a method")
    fit_images, fit_labels = images[keep], labels[keep]
    selection_images, selection_labels = images[held], labels[held]
    suspect_right = correct(model, selection_images, selection_labels, run)
    suspect_acc = percent(suspect_right)
    results, skipped, spent, measuring = [], [], Spent(), 0.0
    for method in params.auto_candidates:
        if reason := unsuitable(method, model):
            skipped.append({"method": method, "reason": reason})
            continue
        cost = sum(stages(method, params, trains_teacher=run.teacher is None).values())
        cutoff = None
        if results and run.deadline is not None:
            estimate, left = spent.estimate(cost), run.deadline - time.monotonic()
            timing = {"method": method, "estimated_seconds": round(estimate), "seconds_left": round(left)}
            if estimate > left:
                skipped.append(timing)
                continue
            cutoff = Cutoff(run.deadline - ESTIMATE_MARGIN * measuring)
        started = time.perf_counter()
        try:
            defended = defend(method, copy.deepcopy(model), fit_images, fit_labels, run.for_candidate(method, cutoff))
        except Cancelled:
            if cutoff is None or not cutoff.reached:
                raise  # the user's cancel
            skipped.append(timing | {"stopped_after_seconds": round(time.perf_counter() - started)})
            continue
        trained = time.perf_counter()
        row = {"method": method} | against_suspect(
            correct(defended.model, selection_images, selection_labels, run), suspect_right)
        if defended.warning:
            row["warning"] = defended.warning
        metrics = measure(defended.model)
        measuring = max(measuring, time.perf_counter() - trained)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["measured"] = {key: metrics.get(key) for key in ("acc", "acc_non_target", "asr", "asr_without_trigger")}
        spent.add(cost, row["seconds"])
        results.append((row, defended, metrics))
    index, reason = pick([result[0] for result in results], suspect_acc, params.auto_budget)
    row, defended, metrics = results[index]
    report = {"chosen": row["method"], "reason": reason, "budget": params.auto_budget,
              "suspect_selection_acc": round(suspect_acc, 2), "selection_images": len(held),
              "trained_on": len(keep), "candidates": [result[0] for result in results], "skipped": skipped}
    return Choice(defended, report, metrics)


@dataclass
class Spent:
    """The time the candidates run so far took, against their cost in epochs of fine-tuning."""

    cost: float = 0.0
    seconds: float = 0.0

    def add(self, cost: float, seconds: float) -> None:
        self.cost, self.seconds = self.cost + cost, self.seconds + seconds

    def estimate(self, cost: float) -> float:
        """Seconds a candidate of `cost` should take, margin included; 0 (it runs) while nothing that trained
        has been timed (`finetune` with a supplied teacher trains nothing) and so there is no rate to go by."""
        if self.cost == 0:
            return 0.0
        return ESTIMATE_MARGIN * cost * self.seconds / self.cost


@dataclass
class Cutoff:
    """Whether a candidate should stop now, asked before each of its epochs (`Watch.should_stop`): when the
    next epoch, taking as long as the longest gap between two asks so far with `ESTIMATE_MARGIN`, would end
    past `deadline`. `reached` tells this stop apart from the user's cancel."""

    deadline: float
    last: float = field(default_factory=time.monotonic)
    longest: float = 0.0
    reached: bool = False

    def __call__(self) -> bool:
        now = time.monotonic()
        self.longest, self.last = max(self.longest, now - self.last), now
        self.reached = now + ESTIMATE_MARGIN * self.longest > self.deadline
        return self.reached
