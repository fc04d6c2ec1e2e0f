"""One sanitization job from files to report: load, measure, defend, measure again, save."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import __version__
from core.engine.auto import SECOND_LOOK, choose
from core.engine.checkpoints import load_weights, read_state_dict, sha256_file, write_checkpoint
from core.engine.data import ImageSet, TooManyImages, load_images, stratified_split
from core.engine.errors import Cancelled, InputError
from core.engine.events import Event, EventSink, ignore
from core.engine.methods import Run, defend, sau_recipe, stages, unsuitable
from core.engine.metrics import attack_success_rate, clean_metrics, predict
from core.engine.models import Distillation, build_model, check_maps, check_runs, choose_distillation
from core.engine.resampling import resampling_sign
from core.engine.training import Execution, Normalization, Watch, to_tensor
from core.engine.triggers import poison
from core.params import SanitizeParams

HOLDOUT_FRACTION = 0.1
# Shares of the whole job's progress bar outside training; training takes the rest, split by epochs.
LOAD_SHARE, EVALUATE_SHARE = 0.02, 0.04


@dataclass(frozen=True)
class JobFiles:
    """Where a job's inputs are and where its cleansed checkpoint goes. Paths the caller chose, never names
    a client sent."""

    checkpoint: Path
    clean_data: Path
    out: Path
    test_data: Path | None = None
    poison_data: Path | None = None
    teacher: Path | None = None


@dataclass(frozen=True)
class Evaluation:
    """The images a model is measured on: a clean test set and, when the attack is known, triggered images
    with their true labels."""

    clean: ImageSet
    poisoned: ImageSet | None
    target_label: int | None
    source: str
    note: str


@dataclass
class ImageBudget:
    """The most images one job may read from its archives together (`limit`; None: no limit) and how many
    each archive read so far held. Each archive is read with what is left, so the one that passes the limit
    is stopped while it is read, and the refusal names it and the archives before it."""

    limit: int | None = None
    loaded: dict[str, int] = field(default_factory=dict)

    def load(self, role: str, path: Path, input_size: int, classes: list[str] | None,
             num_classes: int | None) -> ImageSet:
        """The images of the archive `role` (clean_data, test_data, poison_data), counted against the limit.
        Whatever is wrong with an archive, the message starts with its role: a job has up to three."""
        remaining = None if self.limit is None else self.limit - sum(self.loaded.values())
        try:
            images = load_images(path, input_size, classes, num_classes, remaining)
        except TooManyImages as error:
            raise InputError(self._refusal(role, error)) from None
        except InputError as error:
            raise InputError(f"{role}: {error}") from None
        self.loaded[role] = len(images.labels)
        return images

    def _refusal(self, role: str, error: TooManyImages) -> str:
        held = f"{error.count:,}" if error.count is not None else f"more than {error.limit:,}"
        before = " and ".join(f"the {count:,} of {name}" for name, count in self.loaded.items())
        passes = f"which with {before} is more than" if before else "more than"
        return (f"{role} holds {held} images, {passes} this service's limit of {self.limit:,} images per job; "
                "send fewer images (`nad subset ARCHIVE --fraction F --out part.npz` makes a stratified share "
                "of an archive)")


@dataclass
class Clock:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 3)


def never() -> bool:
    return False


def device() -> torch.device:
    """The GPU when there is one; the engine runs the same on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(params: SanitizeParams, checkpoint: Path) -> nn.Module:
    """The model of `params.arch` in `checkpoint`, checked to classify `params.input_size` images before any
    work."""
    model = build_model(params.arch, params.num_classes)
    load_weights(model, read_state_dict(checkpoint), params.arch)
    check_runs(model, params.arch, params.input_size, params.num_classes)
    return model


def measure(model: nn.Module, evaluation: Evaluation, normalize: Normalization, dev: torch.device,
            execution: Execution) -> dict[str, Any]:
    """ACC (overall, per class, non-target) and ASR of one model."""
    clean = evaluation.clean
    result = clean_metrics(predict(model, clean.images, normalize, dev, execution), clean.labels, clean.classes,
                           evaluation.target_label)
    result["asr"] = None
    if evaluation.poisoned is not None and evaluation.target_label is not None:
        predictions = predict(model, evaluation.poisoned.images, normalize, dev, execution)
        result["asr"] = attack_success_rate(predictions, evaluation.poisoned.labels, evaluation.target_label)
    return result


def _load_teacher(params: SanitizeParams, path: Path) -> nn.Module:
    """The user's teacher, whose faults are said as the teacher's: "the checkpoint does not fit" alone sent
    its owner to the suspect model, which was fine."""
    try:
        return load_model(params, path)
    except InputError as error:
        raise InputError(f"teacher: {error}") from None


def load_clean(path: Path, params: SanitizeParams, budget: ImageBudget | None = None) -> ImageSet:
    """The clean training archive. It fixes the class order for every other archive, so a clean set with
    fewer class folders than the model has classes is refused: sorted folder names would shift the labels."""
    clean = (budget or ImageBudget()).load("clean_data", path, params.input_size, params.classes,
                                           params.num_classes)
    return _every_class(clean, params, "clean data")


def _every_class(images: ImageSet, params: SanitizeParams, what: str) -> ImageSet:
    """`images` when its labels can be trusted: sorted folder names number the classes right only when
    every class has a folder, so without `classes` fewer folders than the model has classes are refused."""
    if params.classes is None and len(images.classes) != params.num_classes:
        raise InputError(
            f"the {what} has {len(images.classes)} classes but the model has {params.num_classes}; "
            "give every class some images, or list all class names in label order with `classes`"
        )
    return images


def evaluate_checkpoint(checkpoint: Path, test_data: Path, params: SanitizeParams,
                        poison_data: Path | None = None) -> tuple[dict[str, Any], Evaluation]:
    """The metrics of one checkpoint on a test archive (ASR from `poison_data` or `params.trigger`)."""
    dev = device()
    execution = Execution.for_mode(params.mode, dev, params.input_size)
    model = execution.prepare(load_model(params, checkpoint).to(dev))
    # Through ImageBudget, unlimited, for its messages: they start with the archive's role, as poison_data's do.
    budget = ImageBudget()
    test = _every_class(budget.load("test_data", test_data, params.input_size, params.classes, params.num_classes),
                        params, "test data")
    evaluation = Evaluation(test, poisoned_set(poison_data, params, test, budget), params.target_label, "test_data",
                            f"{len(test.labels)} test images")
    return measure(model, evaluation, Normalization(params.mean, params.std), dev, execution), evaluation


def prepare_evaluation(files: JobFiles, params: SanitizeParams, clean: ImageSet,
                       budget: ImageBudget) -> tuple[ImageSet, Evaluation]:
    """The training images and the evaluation sets: the test archive when given, else a stratified hold-out
    of the clean data (said so in the report)."""
    if files.test_data is not None:
        test = budget.load("test_data", files.test_data, params.input_size, clean.classes, params.num_classes)
        train_set, source = clean, "test_data"
        note = f"measured on the {len(test.labels)} images of the test archive"
    else:
        keep, held = stratified_split(clean.labels, HOLDOUT_FRACTION, params.seed)
        train_set, test, source = clean.subset(keep), clean.subset(held), "holdout"
        note = (f"no test set given: measured on a stratified hold-out of {len(held)} clean images "
                f"({HOLDOUT_FRACTION:.0%}), trained on the other {len(keep)}")
    return train_set, Evaluation(test, poisoned_set(files.poison_data, params, test, budget),
                                 params.target_label, source, note)


def poisoned_set(poison_data: Path | None, params: SanitizeParams, test: ImageSet,
                 budget: ImageBudget | None = None) -> ImageSet | None:
    """Triggered images with their true labels, the target class left out: the user's poison archive, or the
    trigger spec applied to the clean test images; None when the attack is unknown."""
    if poison_data is not None:
        if params.target_label is None:
            raise InputError("poison_data needs target_label, the class the attack aims at")
        loaded = (budget or ImageBudget()).load("poison_data", poison_data, params.input_size, test.classes,
                                                params.num_classes)
        return loaded.subset(np.flatnonzero(loaded.labels != params.target_label))
    if params.trigger is not None and params.target_label is not None:
        images, labels = poison(test.images, test.labels, params.trigger, params.target_label)
        return ImageSet(images, labels, test.classes)
    return None


def _training_spans(stages: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Progress shares of the training stages, proportional to their epochs."""
    start, end = LOAD_SHARE + EVALUATE_SHARE, 1.0 - EVALUATE_SHARE
    total, done, spans = max(sum(stages.values()), 1), 0, {}
    for stage, epochs in stages.items():
        spans[stage] = (start + (end - start) * done / total, start + (end - start) * (done + epochs) / total)
        done += epochs
    return spans


def runnable(params: SanitizeParams, model: nn.Module) -> list[str]:
    """The methods the job will run on `model`: its method, or those of `auto`'s candidates that can clean it
    (`methods.unsuitable`; `auto` lists the others as skipped). An InputError, before anything trains, when
    none can."""
    candidates = params.auto_candidates if params.method == "auto" else [params.method]
    reasons = {method: unsuitable(method, model) for method in candidates}
    kept = [method for method, reason in reasons.items() if reason is None]
    if not kept:
        raise InputError(f"{'; '.join(reasons.values())}: use nad, finetune, sau or ibau")
    return kept


def _missing_classes(clean: ImageSet, num_classes: int) -> list[str]:
    """A warning when the clean images leave classes out (an npz's labels may, and folders may where `classes`
    names every class; without it, fewer folders than classes are refused):
    every method fine-tunes on them, and a model fine-tuned without a class's images may forget that class."""
    missing = sorted(set(range(num_classes)) - set(np.unique(clean.labels).tolist()))
    if not missing:
        return []
    named = ", ".join(clean.classes[label] if label < len(clean.classes) else str(label) for label in missing[:10])
    return [f"clean_data holds no image of {len(missing)} of the model's {num_classes} classes ({named}"
            f"{', ...' if len(missing) > 10 else ''}): the model was fine-tuned without them and may have "
            "forgotten them; send some images of every class"]


def _stop_if_asked(should_stop: Callable[[], bool], stage: str) -> None:
    """A cancel is honoured between stages as between epochs: loading and measuring a large data set take
    minutes of their own."""
    if should_stop():
        raise Cancelled(f"cancelled before {stage}")


def _teacher_note(params: SanitizeParams, files: JobFiles) -> str | None:
    """Where the teacher of nad and finetune came from; `auto`'s too when either is a candidate, since a
    supplied teacher serves them there as well."""
    if params.teacher_unused:
        return None
    return "supplied" if files.teacher else f"fine-tuned {params.teacher_epochs} epochs"


@dataclass(frozen=True, eq=False)
class LoadedJob:
    """What a job's files give the engine, on its device: the suspect model, the methods that can clean it
    (with `nad`'s layers when it is one), the training images and the sets it is measured on."""

    model: nn.Module
    methods: list[str]
    distillation: Distillation | None
    teacher: nn.Module | None
    clean: ImageSet
    evaluation: Evaluation
    images: torch.Tensor
    labels: torch.Tensor

    def evaluation_report(self) -> dict[str, Any]:
        """What the images are that the job trained on and was measured on, for the report."""
        evaluation = self.evaluation
        return {"test_source": evaluation.source, "note": evaluation.note, "n_train": len(self.labels),
                "n_clean": len(evaluation.clean.labels),
                "n_poison": None if evaluation.poisoned is None else len(evaluation.poisoned.labels),
                "target_label": evaluation.target_label}


def _load(files: JobFiles, params: SanitizeParams, execution: Execution, dev: torch.device,
          max_images: int | None) -> LoadedJob:
    """Every input of the job, checked before anything trains: the model first, so that one the methods
    cannot clean is refused before its images are read."""
    model = execution.prepare(load_model(params, files.checkpoint).to(dev))
    methods = runnable(params, model)
    distillation = choose_distillation(params.arch, model, params.layers, params.betas) if "nad" in methods else None
    if distillation is not None:
        check_maps(model, distillation.layers, params.input_size)
    budget = ImageBudget(max_images)
    clean = load_clean(files.clean_data, params, budget)
    train_set, evaluation = prepare_evaluation(files, params, clean, budget)
    teacher = execution.prepare(_load_teacher(params, files.teacher).to(dev)) if files.teacher else None
    return LoadedJob(model, methods, distillation, teacher, clean, evaluation,
                     to_tensor(train_set.images, dev), torch.from_numpy(train_set.labels).to(dev))


def sanitize(
    files: JobFiles,
    params: SanitizeParams,
    on_event: EventSink = ignore,
    should_stop: Callable[[], bool] = never,
    max_images: int | None = None,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """Run one job and return its report (a JSON-able dict); the cleansed checkpoint is written to `files.out`.

    Raises InputError for files or parameters that cannot be used, an archive that takes the job's images
    past `max_images` included (the caller's cap on clean, test and poison images together), Cancelled when
    `should_stop()` turned true (checked between stages and epochs, and every few dozen iterations of anp).
    `time_limit`, the seconds the caller gives the job from now, is what `auto` runs its candidates within; a
    single method is never stopped for it (the caller enforces its own limit).
    """
    deadline = None if time_limit is None else time.monotonic() + time_limit
    clock, dev = Clock(), device()
    normalize = Normalization(params.mean, params.std)
    execution = Execution.for_mode(params.mode, dev, params.input_size)
    on_event(Event("load", 0.0))
    with clock.time("load"):
        job = _load(files, params, execution, dev, max_images)
    _stop_if_asked(should_stop, "the first evaluation")
    on_event(Event("evaluate_before", LOAD_SHARE))
    with clock.time("evaluate_before"):
        before = measure(job.model, job.evaluation, normalize, dev, execution)
    on_event(Event("evaluate_before", LOAD_SHARE + EVALUATE_SHARE))

    spans = _training_spans(stages(params.method, params, trains_teacher=job.teacher is None))
    history: list[dict[str, Any]] = []

    def watch(stage: str) -> Watch:
        # auto's second look at a candidate runs only when its choice is close, so it has no share of the plan:
        # its epochs are told where training ends.
        span = (1.0 - EVALUATE_SHARE,) * 2 if f"/{SECOND_LOOK}/" in stage else spans[stage]
        return Watch(stage, on_event, should_stop, *span, history)

    _stop_if_asked(should_stop, "the resampling sign")
    with clock.time("resampling_sign"):
        resampling = resampling_sign(job.model, job.images, normalize, execution)
    _stop_if_asked(should_stop, "training")
    run = Run(params, job.teacher, job.distillation, resampling, normalize, execution, watch, clock,
              deadline=deadline)
    if params.method == "auto":
        chosen = choose(job.model, job.images, job.labels, run,
                        lambda candidate: measure(candidate, job.evaluation, normalize, dev, execution))
        # auto measured every candidate on the evaluation set already: the chosen one's figures are "after".
        defended, auto, after = chosen.defended, chosen.report, chosen.metrics
    else:
        defended = defend(params.method, job.model, job.images, job.labels, run)
        auto = after = None
    result, pruning, warning = defended.model, defended.pruning, defended.warning
    _stop_if_asked(should_stop, "the final evaluation")

    on_event(Event("evaluate_after", 1.0 - EVALUATE_SHARE))
    if after is None:
        with clock.time("evaluate_after"):
            after = measure(result, job.evaluation, normalize, dev, execution)
    report = {
        "arch": params.arch,
        "num_classes": params.num_classes,
        "classes": job.clean.classes,
        "method": params.method,
        "params": params.model_dump(mode="json"),
        "input_sha256": sha256_file(files.checkpoint),
        "nad_version": __version__,
        "teacher": _teacher_note(params, files),
        "layers": list(job.distillation.layers) if params.method == "nad" else [],
        "betas": list(job.distillation.betas) if params.method == "nad" else [],
        "pruning": pruning,
        "bias_shift": defended.bias_shift,
        "auto": auto,
        "resampling": {**resampling.report(),
                       "sau_warp": sau_recipe(params, resampling).warp if "sau" in job.methods else None},
        "warnings": [*_missing_classes(job.clean, params.num_classes), *([warning] if warning else [])],
        "evaluation": job.evaluation_report(),
        "before": before,
        "after": after,
        "history": history,
        "device": str(dev),
    }
    write_checkpoint(result, files.out, {
        "arch": params.arch, "num_classes": params.num_classes, "classes": job.clean.classes,
        "method": params.method, "params": report["params"], "input_sha256": report["input_sha256"],
    })
    clock.timings["total"] = round(sum(clock.timings.values()), 3)
    report["timings"] = clock.timings
    on_event(Event("done", 1.0))
    return report
