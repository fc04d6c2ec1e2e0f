"""`method: auto`: run several defenses and keep the one that clean data says is best.

The user usually does not know the trigger, so the choice may use clean data only. A tenth of the clean
training images (stratified) is set aside as a selection set; every candidate method cleans its own copy of
the suspect model on the other nine tenths; each is measured on the selection set by

- its clean accuracy, which must stay within `auto_budget` points of the suspect's, and
- how far its features moved from the suspect's: 1 - the mean cosine similarity of the penultimate features
  (the classifier head's input) of the two models on the selection images. Purification comes with such a
  shift (Min et al., NeurIPS 2023, the observation behind FST); a candidate that left the features where
  they were most likely left the backdoor with them.

Of the candidates within the budget the one with the largest shift wins; when none stays within it, the same
rule applies with the most accurate candidate's accuracy in place of the suspect's, and the report says so.
The signal is a heuristic: it favours methods that retrain (fst, nad, finetune) over pruning (anp), whose
clean features move little even when it removed the backdoor.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.engine.data import stratified_split
from core.engine.methods import Run, defend
from core.engine.models import classifier_head

SELECTION_FRACTION = 0.1


@dataclass(frozen=True)
class Choice:
    model: nn.Module
    pruning: dict[str, Any] | None
    report: dict[str, Any]


@torch.inference_mode()
def look(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run) -> tuple[float, torch.Tensor]:
    """Clean accuracy (percent) on `images` and their penultimate features, in evaluation mode."""
    model.eval()
    captured: list[torch.Tensor] = []
    hook = classifier_head(model).register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].float()))
    correct = 0
    try:
        for start in range(0, len(images), run.execution.eval_batch):
            batch = images[start:start + run.execution.eval_batch]
            with run.execution.autocast(images.device):
                logits = model(run.execution.inputs(run.normalize(batch)))
            correct += int((logits.argmax(1) == labels[start:start + len(batch)]).sum())
    finally:
        hook.remove()
    return 100.0 * correct / len(images), torch.cat(captured).flatten(1)


def feature_shift(features: torch.Tensor, reference: torch.Tensor) -> float:
    """1 - the mean cosine similarity of matching rows: 0 for the same features, up to 2 for opposite ones."""
    return 1.0 - float(torch.nn.functional.cosine_similarity(features, reference, dim=1).mean())


def pick(rows: list[dict[str, Any]], suspect_acc: float, budget: float) -> tuple[int, str]:
    """The index of the candidate to keep among `rows` (each with selection_acc and feature_shift), and why:
    within `budget` points of `suspect_acc`, the largest feature shift. When none is within it, the same rule
    with the most accurate candidate as the yardstick: the suspect may have trained on the clean images (it
    scores 5 to 10 points higher on them than on unseen ones), and the most accurate candidate is usually the
    one that changed the model least, so keeping it alone would keep the backdoor too."""
    eligible = _within(rows, suspect_acc, budget)
    if eligible:
        best = max(eligible, key=lambda i: rows[i]["feature_shift"])
        return best, (f"{rows[best]['method']} kept clean accuracy on the selection set within {budget} points "
                      f"of the suspect's {suspect_acc:.2f} % and moved the features furthest from the suspect's")
    top = max(row["selection_acc"] for row in rows)
    best = max(_within(rows, top, budget), key=lambda i: rows[i]["feature_shift"])
    return best, (f"no candidate kept clean accuracy within {budget} points of the suspect's {suspect_acc:.2f} %; "
                  f"of those within {budget} points of the most accurate ({top:.2f} %), {rows[best]['method']} "
                  f"moved the features furthest from the suspect's")


def _within(rows: list[dict[str, Any]], acc: float, budget: float) -> list[int]:
    return [i for i, row in enumerate(rows) if row["selection_acc"] >= acc - budget]


def choose(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run,
           measure: Callable[[nn.Module], dict[str, Any]]) -> Choice:
    """Run every candidate of `run.params.auto_candidates` on a copy of `model` and return the chosen one.

    `measure` gives each candidate's metrics on the job's evaluation set (its ACC, and ASR when the attack is
    known). They go into the report, so that a user who knows the attack sees what every candidate did, and
    play no part in the choice."""
    params = run.params
    keep, held = (torch.from_numpy(index).to(images.device)
                  for index in stratified_split(labels.cpu().numpy(), SELECTION_FRACTION, params.seed))
    fit_images, fit_labels = images[keep], labels[keep]
    selection_images, selection_labels = images[held], labels[held]
    suspect_acc, suspect_features = look(model, selection_images, selection_labels, run)
    results = []
    for method in params.auto_candidates:
        started = time.perf_counter()
        cleaned, pruning = defend(method, copy.deepcopy(model), fit_images, fit_labels, run.for_candidate(method))
        acc, features = look(cleaned, selection_images, selection_labels, run)
        row = {"method": method, "selection_acc": round(acc, 2),
               "feature_shift": round(feature_shift(features, suspect_features), 4),
               "seconds": round(time.perf_counter() - started, 1)}
        measured = measure(cleaned)
        row["measured"] = {key: measured.get(key) for key in ("acc", "acc_non_target", "asr")}
        results.append((row, cleaned, pruning))
    index, reason = pick([result[0] for result in results], suspect_acc, params.auto_budget)
    row, cleaned, pruning = results[index]
    report = {"chosen": row["method"], "reason": reason, "budget": params.auto_budget,
              "suspect_selection_acc": round(suspect_acc, 2), "selection_images": len(held),
              "trained_on": len(keep), "candidates": [result[0] for result in results]}
    return Choice(cleaned, pruning, report)
