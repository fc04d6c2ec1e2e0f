"""`method: auto`: run several defenses and keep the one that clean data says is best.

The user usually does not know the trigger, so the choice may use clean data only. A tenth of the clean
training images (stratified) is set aside as a selection set; every candidate method cleans its own copy of
the suspect model on the other nine tenths and is measured on the selection set by its clean accuracy, which
must stay within `auto_budget` points of the suspect's. Of the candidates within the budget the first in
`auto_candidates` order wins: the order is the user's (by default the project's) ranking of how surely each
method erases a backdoor, and the budget says how much accuracy that surety may cost. When no candidate is
within the budget, the most accurate one is kept (the first of them, on a tie), and the report says so: the
budget is spent, and every point a less accurate candidate reads under it is one more the user loses.

A few hundred images measure a gap of the budget's size with noise of about that size, so a candidate before
the kept one that missed the budget by no more than its gap's standard error gets a second look
(`close_misses`): it is trained again with another tenth set aside, none of it in the first, and measured
there; on the two sets together, twice the images, its gap decides, and within the budget it is kept. It runs
in the job's time as a candidate does, and costs one more run of that candidate only when a choice is that close.

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

import numpy as np
import torch
from torch import nn

from core.engine.data import stratified_split
from core.engine.errors import Cancelled, InputError
from core.engine.methods import Defended, Run, defend, stages, unsuitable
from core.engine.metrics import classify, percent

SELECTION_FRACTION = 0.1
# The stage names of a candidate's second look are `<method>/second_look/<stage>`; the job's progress plan has no
# share for them (sanitize.py), since one runs only when a choice is close.
SECOND_LOOK = "second_look"
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


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run) -> np.ndarray:
    """Which of `images` the model classifies right, in evaluation mode (a boolean per image)."""
    return (classify(model, images, run.normalize, run.execution) == labels).cpu().numpy()


def fits(acc: float, reference: float, budget: float) -> bool:
    """Whether `acc` is within `budget` points of `reference`. Both are in hundredths of a point: the margin is
    there so that the float error of the subtraction cannot put a candidate exactly on the budget's edge out."""
    return acc >= reference - budget - 1e-9


def against_suspect(right: np.ndarray, suspect_right: np.ndarray) -> dict[str, Any]:
    """A candidate's selection accuracy and how it differs from the suspect's, image by image.

    The budget compares two accuracies on the same few hundred images, so the gap is noisy: it rests on the
    images one model gets right and the other wrong. `selection_lost` counts those the suspect got right,
    `selection_gained` the others, and `selection_gap_se` is the standard error (points) of the paired gap they
    give: it says how far a user can trust the choice, and which candidates get a second look (`close_misses`)."""
    images = len(right)
    lost = int((suspect_right & ~right).sum())
    gained = int((right & ~suspect_right).sum())
    se = 100.0 * math.sqrt(lost + gained - (gained - lost) ** 2 / images) / images
    return {"selection_acc": percent(right), "selection_lost": lost, "selection_gained": gained,
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
    trusted = _trusted(rows)
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
    return [i for i in indices if fits(rows[i]["selection_acc"], acc, budget)]


def _trusted(rows: list[dict[str, Any]]) -> list[int]:
    """The candidates without a warning, or every one when each has one."""
    return [i for i, row in enumerate(rows) if not row.get("warning")] or list(range(len(rows)))


def close_misses(rows: list[dict[str, Any]], kept: int, suspect_acc: float, budget: float) -> list[int]:
    """The candidates before `kept` in preference order (and trusted as `pick` trusts them) that read out of the
    budget by no more than their gap's standard error (`selection_gap_se`): each gets a second look.

    Why: on 250 images a gap of the budget's size is measured with noise of about the same size (2.5 points for
    `nad` on the NAD authors' model at seed 6, where it read 3.6 points under the suspect on the selection set and
    `auto` kept `sau`, which left the backdoor: 75 % ASR, where `nad` erased it at 3.7 % and 79.8 % accuracy, 4
    points above the suspect's on the test set). Widening the budget by the error instead would have kept `nad`
    there, and kept it on our GPU-trained warp at seed 2 too, 4.0 points under on the selection set and 4.9 under
    the suspect on the test set (docs/results.md): noise misleads both ways, so a close call is measured again,
    on other images, rather than given the benefit of the doubt."""
    return [i for i in _trusted(rows) if i < kept and not fits(rows[i]["selection_acc"], suspect_acc, budget)
            and fits(rows[i]["selection_acc"], suspect_acc, budget + rows[i]["selection_gap_se"])]


def decide(rows: list[dict[str, Any]], suspect_acc: float, budget: float,
           look: Callable[[int], dict[str, Any]]) -> tuple[int, str]:
    """`pick`, then a second look at each close miss in preference order (`look(i)` gives candidate i's, as the
    report holds it under its row's `second_look`) until one is within the budget on both sets: that one is
    kept. The index of the candidate kept, and why."""
    index, reason = pick(rows, suspect_acc, budget)
    for close in close_misses(rows, index, suspect_acc, budget):
        rows[close]["second_look"] = look(close)
        verdict = _second_look_verdict(rows[close], suspect_acc, budget)
        if rows[close]["second_look"].get("within_budget"):
            return close, f"{verdict}; without it: {reason}"
        reason = f"{reason}; {verdict}"
    return index, reason


@dataclass(frozen=True)
class Split:
    """The clean images parted for the choice: candidates train on `fit_images` and are measured on the held-out
    `images`, image by image against the suspect (`suspect_right`)."""

    fit_images: torch.Tensor
    fit_labels: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    suspect_right: np.ndarray

    @classmethod
    def of(cls, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, held: np.ndarray, run: Run) -> Split:
        """`held` (indices) set aside, the rest to train on."""
        keep = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), held)).to(images.device)
        aside = torch.from_numpy(held).to(images.device)
        return cls(images[keep], labels[keep], images[aside], labels[aside],
                   correct(model, images[aside], labels[aside], run))


@dataclass(frozen=True)
class Ran:
    """A candidate that ran: its report row, its model, its metrics on the job's evaluation set, and which
    selection images it got right."""

    row: dict[str, Any]
    defended: Defended
    metrics: dict[str, Any]
    right: np.ndarray


def choose(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run,
           measure: Callable[[nn.Module], dict[str, Any]]) -> Choice:
    """Run the candidates of `run.params.auto_candidates` that the job's time allows, each on a copy of
    `model`, give a second look to those that missed the budget by no more than its noise (`close_misses`), and
    return the chosen one.

    `measure` gives each candidate's metrics on the job's evaluation set (its ACC, and ASR when the attack is
    known). They go into the report, so that a user who knows the attack sees what every candidate did, and
    play no part in the choice."""
    params = run.params
    _, held = stratified_split(labels.cpu().numpy(), SELECTION_FRACTION, params.seed)
    if not len(held):
        raise InputError("auto sets a tenth of the clean images aside to choose among its candidates, and every "
                         "class of this clean data has a single image; give more clean images, or choose a method")
    first = Split.of(model, images, labels, held, run)
    suspect_acc = percent(first.suspect_right)
    results: list[Ran] = []
    skipped, spent, measuring = [], Spent(), 0.0
    for method in params.auto_candidates:
        if reason := unsuitable(method, model):
            skipped.append({"method": method, "reason": reason})
            continue
        started = time.perf_counter()
        defended, timing = _train(method, method, model, first, run, spent,
                                  ESTIMATE_MARGIN * measuring if results else None)
        if defended is None:
            skipped.append(timing)
            continue
        trained = time.perf_counter()
        right = correct(defended.model, first.images, first.labels, run)
        row = {"method": method} | against_suspect(right, first.suspect_right)
        if defended.warning:
            row["warning"] = defended.warning
        metrics = measure(defended.model)
        measuring = max(measuring, time.perf_counter() - trained)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["measured"] = {key: metrics.get(key) for key in ("acc", "acc_non_target", "asr", "asr_without_trigger")}
        spent.add(_cost(method, run), row["seconds"])
        results.append(Ran(row, defended, metrics, right))
    rows = [ran.row for ran in results]
    index, reason = decide(rows, suspect_acc, params.auto_budget,
                           lambda i: second_look(model, images, labels, held, results[i], first, run, spent))
    chosen = results[index]
    report = {"chosen": chosen.row["method"], "reason": reason, "budget": params.auto_budget,
              "suspect_selection_acc": suspect_acc, "selection_images": len(held),
              "trained_on": len(first.fit_labels), "candidates": rows, "skipped": skipped}
    return Choice(chosen.defended, report, chosen.metrics)


def _train(method: str, name: str, model: nn.Module, split: Split, run: Run, spent: Spent,
           reserve: float | None) -> tuple[Defended | None, dict[str, Any]]:
    """`method` run on a copy of `model`, trained on `split`'s fit images within the job's time, its stages named
    `name`/...: the cleansed model, or None when it did not run, with its timing (method; where estimated,
    estimated_seconds and seconds_left; where it started but was stopped, stopped_after_seconds). `reserve`: the
    seconds to leave after it for measuring it; None runs it unestimated and unstopped (the first candidate, and
    any while nothing before it has trained: a single method, or the first candidate, is stopped by the job's own
    limit)."""
    timing: dict[str, Any] = {"method": method}
    cutoff = None
    if reserve is not None and run.deadline is not None:
        estimate, left = spent.estimate(_cost(method, run)), run.deadline - time.monotonic()
        timing |= {"estimated_seconds": round(estimate), "seconds_left": round(left)}
        if estimate > left:
            return None, timing
        cutoff = Cutoff(run.deadline - reserve)
    started = time.perf_counter()
    try:
        return defend(method, copy.deepcopy(model), split.fit_images, split.fit_labels,
                      run.for_candidate(name, cutoff)), timing
    except Cancelled:
        if cutoff is None or not cutoff.reached:
            raise  # the user's cancel
        return None, timing | {"stopped_after_seconds": round(time.perf_counter() - started)}


def _cost(method: str, run: Run) -> int:
    """`method`'s cost in epochs of fine-tuning (`methods.stages`), by which `Spent` estimates its time."""
    return sum(stages(method, run.params, trains_teacher=run.teacher is None).values())


def second_held(labels: np.ndarray, held: np.ndarray, seed: int) -> np.ndarray:
    """Indices of a second selection set for a second look: about as many images as `held`, drawn from the others
    stratified by class (the same share of each class's), so that the two sets together measure a candidate on
    about twice the images; a class that `held` rounded up to one image may count one more or less here. With
    very few images a class (two or three) it takes at most half of what is left, and none of a class with one
    image left; it may be empty."""
    rest = np.setdiff1d(np.arange(len(labels)), held)
    _, inner = stratified_split(labels[rest], min(len(held) / len(rest), 0.5), seed)
    return rest[inner]


def second_look(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, held: np.ndarray, ran: Ran,
                first: Split, run: Run, spent: Spent) -> dict[str, Any]:
    """The candidate of `ran` trained again, with another tenth of the clean images set aside (as many as
    `held`, none of them in it), and measured there against the suspect; then on both sets together, whose
    gap decides. Its stages are `<method>/second_look/...`. The report entry: that set's figures (as a
    candidate's row has them), `both` (the same on the two sets together) and `within_budget`; or, when the
    job's time left no room for it, the estimate and the time left (or `stopped_after_seconds`); or a `reason`
    when no second set can be drawn."""
    method, budget = ran.row["method"], run.params.auto_budget
    aside = second_held(labels.cpu().numpy(), held, run.params.seed)
    if not len(aside):
        return {"reason": "every class has a single clean image left outside the selection set, so none can be "
                          "set aside for it"}
    second = Split.of(model, images, labels, aside, run)
    started = time.perf_counter()
    defended, timing = _train(method, f"{method}/{SECOND_LOOK}", model, second, run, spent, 0.0)
    timing.pop("method")
    if defended is None:
        return timing
    right = correct(defended.model, second.images, second.labels, run)
    spent.add(_cost(method, run), time.perf_counter() - started)
    suspect_right = np.concatenate([first.suspect_right, second.suspect_right])
    both = {"selection_images": len(suspect_right), "suspect_selection_acc": percent(suspect_right),
            **against_suspect(np.concatenate([ran.right, right]), suspect_right)}
    return {"selection_images": len(second.labels), "suspect_selection_acc": percent(second.suspect_right),
            **against_suspect(right, second.suspect_right), "both": both,
            "within_budget": fits(both["selection_acc"], both["suspect_selection_acc"], budget),
            "seconds": round(time.perf_counter() - started, 1)}


def _under(gap: float) -> str:
    return f"{gap:.2f} under" if gap >= 0 else f"{-gap:.2f} over"


def _second_look_verdict(row: dict[str, Any], suspect_acc: float, budget: float) -> str:
    """What a close miss's second look found, for the reason."""
    method, look = row["method"], row["second_look"]
    missed = (f"{method} read {suspect_acc - row['selection_acc']:.2f} points under the suspect's {suspect_acc:.2f} % "
              f"on the selection set, out of the {budget}-point budget by no more than that gap's standard error "
              f"({row['selection_gap_se']:.2f})")
    if "reason" in look:
        return f"{missed}, and it got no second look: {look['reason']}"
    if "both" not in look:
        return f"{missed}, and a second look at it did not fit in the job's time"
    both = look["both"]
    gap = both["suspect_selection_acc"] - both["selection_acc"]
    found = (f"{missed}; trained again with another {look['selection_images']} images set aside, it read "
             f"{_under(look['suspect_selection_acc'] - look['selection_acc'])} there, {_under(gap)} on all "
             f"{both['selection_images']}")
    if look["within_budget"]:
        return f"{method} is kept on a second look: {found}, within the budget, and it comes first"
    return f"{found}: still out of the budget"


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
