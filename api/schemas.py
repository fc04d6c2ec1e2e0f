"""What the API answers with: the job resource, a page of jobs, a job's metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.jobs import FINISHED, OUTPUT, Job, Status

JOB_ID_EXAMPLE = "0192f3a4c5d6e7f8a9b0c1d2e3f4a5b6"


class Progress(BaseModel):
    stage: str | None = Field(
        description="load, evaluate_before, the method's stages (teacher, student, fst, anp, ibau, sau; under "
                    "auto named after the candidate, nad/student, and nad/second_look/student while a candidate "
                    "gets a second look, during which percent stays where training ends), evaluate_after or done; "
                    "null before the start",
        examples=["student"],
    )
    epoch: int | None = Field(description="the epoch of `stage` under way (1-based)", examples=[3])
    epochs: int | None = Field(description="epochs in `stage`", examples=[20])
    percent: float = Field(description="share of the whole job done", examples=[42.5])


class StoredFile(BaseModel):
    filename: str | None = Field(description="the name the client sent (for display)", examples=["model.pt"])
    size: int = Field(description="bytes", examples=[1426651])
    sha256: str


class JobResource(BaseModel):
    """A sanitization job, as `GET /jobs/{id}` shows it."""

    id: str = Field(examples=[JOB_ID_EXAMPLE])
    status: Status
    progress: Progress
    attempts: int = Field(description="how often a worker started the job (more than 1 after a worker died)")
    error: str | None = Field(description="why the job failed, and what to do about it")
    timestamps: dict[str, datetime] = Field(
        description="when the job entered each status it went through (queued, running, cancelling, and its "
                    "final one); after a worker died, running is its latest start",
        examples=[{"queued": "2026-01-05T10:00:00Z", "running": "2026-01-05T10:00:02Z"}],
    )
    updated_at: datetime
    params: dict[str, Any] = Field(description="the job's SanitizeParams, defaults filled in")
    inputs: dict[str, StoredFile] = Field(description="the uploaded files by field name")
    output: StoredFile | None = Field(description="the cleansed checkpoint, once the job succeeded")
    links: dict[str, str] = Field(
        description="the job's own URL (self) and what can be done with it now: cancel while it is unfinished, "
                    "metrics and model once it succeeded",
        examples=[{"self": f"/jobs/{JOB_ID_EXAMPLE}", "metrics": f"/jobs/{JOB_ID_EXAMPLE}/metrics",
                   "model": f"/jobs/{JOB_ID_EXAMPLE}/model"}]
    )

    @classmethod
    def of(cls, job: Job) -> JobResource:
        # A job cancelled while queued never ran, so it went straight to cancelled, never through cancelling.
        timestamps = {Status.QUEUED: job.created_at, Status.RUNNING: job.started_at,
                      Status.CANCELLING: job.cancel_requested_at if job.started_at else None}
        if job.status in FINISHED:
            timestamps[job.status] = job.finished_at
        files = {a.role: StoredFile(filename=a.filename, size=a.size, sha256=a.sha256) for a in job.artifacts}
        output = files.pop(OUTPUT, None)
        if output is not None:  # the name the download gives it
            output = output.model_copy(update={"filename": f"{job.id}.safetensors"})
        base = f"/jobs/{job.id}"
        if job.status == Status.SUCCEEDED:
            links = {"self": base, "metrics": f"{base}/metrics", "model": f"{base}/model"}
        else:
            links = {"self": base} if job.status in FINISHED else {"self": base, "cancel": f"{base}/cancel"}
        return cls(
            id=job.id,
            status=job.status,
            progress=Progress(stage=job.stage, epoch=job.epoch, epochs=job.epochs,
                              percent=round(100 * job.progress, 1)),
            attempts=job.attempts,
            error=job.error,
            timestamps={str(status): at for status, at in timestamps.items() if at is not None},
            updated_at=job.updated_at,
            params=job.params,
            inputs=files,
            output=output,
            links=links,
        )


class JobPage(BaseModel):
    items: list[JobResource]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class Measurement(BaseModel):
    model_config = ConfigDict(extra="allow")

    acc: float = Field(description="clean accuracy, percent", examples=[76.56])
    acc_non_target: float | None = Field(default=None, description="ACC without the target class's images, "
                                         "as the NAD paper reports it", examples=[74.1])
    asr: float | None = Field(description="attack success rate, percent; null when the attack is unknown",
                              examples=[100.0])
    asr_without_trigger: float | None = Field(
        default=None, description="the attack success rate of the clean test images, no trigger: the percent of "
        "non-target images the model puts in the target class through ordinary errors, which `asr` counts too; "
        "null when the target is unknown", examples=[3.6])
    per_class_acc: dict[str, float] = Field(examples=[{"airplane": 81.2, "automobile": 88.0}])


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="allow")

    test_source: str = Field(description="test_data (uploaded) or holdout (split off clean_data)")
    note: str
    n_clean: int
    n_poison: int | None


class Metrics(BaseModel):
    """The engine's report of a succeeded job, as stored when it finished."""

    model_config = ConfigDict(extra="allow")

    job_id: str = Field(examples=[JOB_ID_EXAMPLE])
    arch: str = Field(examples=["wrn-16-1"])
    num_classes: int = Field(examples=[10])
    method: str = Field(examples=["nad"])
    classes: list[str] | None = Field(default=None, description="the class names, in label order, as the clean "
                                      "data gave them", examples=[["airplane", "automobile"]])
    input_sha256: str = Field(description="sha256 of the uploaded checkpoint")
    nad_version: str | None = Field(default=None, description="the version of nad-service that ran the job, as "
                                    "the cleansed checkpoint's metadata says too (null for jobs run before it was "
                                    "recorded)", examples=["0.1.0"])
    teacher: str | None = Field(
        default=None, description="methods nad and finetune, and auto with either as a candidate: where the "
        "teacher came from (supplied, or fine-tuned for how many epochs); null for the other methods",
        examples=["fine-tuned 10 epochs"])
    layers: list[str] = Field(default_factory=list, description="method nad: the layers whose attention was "
                              "distilled; empty for the other methods", examples=[["block1", "block2", "block3"]])
    betas: list[float] = Field(default_factory=list, description="method nad: the attention loss's weight for "
                               "each of layers", examples=[[500, 1000, 1000]])
    params: dict[str, Any]
    evaluation: Evaluation
    before: Measurement
    after: Measurement
    history: list[dict[str, Any]] = Field(
        description="one row per training epoch: stage (teacher/student/fst), epoch, epochs, loss, lr, ...; for "
                    "anp one row per 50 mask iterations: stage, step, steps, loss, nat_loss, rob_loss, lr, ...; "
                    "for ibau one row per round (counted as epochs): stage, epoch, epochs, loss, delta_norm, lr; for "
                    "sau one row per epoch: stage, epoch, epochs, loss, clean_loss, shared_loss, poison_share, lr, "
                    "anchored (true where the clean term distilled the suspect's predictions: the first "
                    "sau_anchor_epochs, and every epoch of a retry), bound (the perturbations' box), retry (true "
                    "on the rows of the retry in a sixteenth of the box, after the first epoch that ended saturated)",
        examples=[[{"stage": "student", "epoch": 1, "epochs": 20, "loss": 0.41, "lr": 0.1}]],
    )
    pruning: dict[str, Any] | None = Field(
        default=None,
        description="method anp only: the threshold, how many BatchNorm neurons of how many were pruned, and the "
                    "same per layer",
        examples=[{"threshold": 0.2, "pruned": 8, "neurons": 464, "layers": {"bn1": {"pruned": 5, "neurons": 64}}}],
    )
    bias_shift: list[float] | None = Field(
        default=None,
        description="nad (alone or kept by auto) with nad_refit_bias: what the refit added to its classifier's "
                    "bias, one value a class; null for the other methods and where the classifier has no bias",
        examples=[[0.0121, -0.0733, 0.0402]],
    )
    auto: dict[str, Any] | None = Field(
        default=None,
        description="method auto only: what it ran, what it chose and why. chosen, reason, budget, "
                    "suspect_selection_acc, selection_images, trained_on; candidates, one row per candidate run "
                    "(method, selection_acc, seconds, measured: acc, acc_non_target, asr, asr_without_trigger; "
                    "selection_lost and selection_gained, the selection images the suspect got right and the "
                    "candidate wrong and the other way, on which the gap between their accuracies rests, and "
                    "selection_gap_se, that gap's standard error in points: how far the choice can be trusted; "
                    "warning, when clean-data signals say the backdoor may have survived, as in warnings: such a "
                    "candidate is kept only when every one has one; second_look, for a candidate before the kept "
                    "one that missed the budget by no more than selection_gap_se: trained again with as many other "
                    "images set aside, its figures there (selection_images, suspect_selection_acc, selection_acc, "
                    "selection_lost, selection_gained, selection_gap_se, seconds), both, the same on the two sets "
                    "together, and within_budget, whether both keeps it within the budget, and so kept; or "
                    "estimated_seconds and seconds_left, or stopped_after_seconds, when the job's time had no room "
                    "for it, or reason, when too few images a class were left to set aside); skipped, the candidates "
                    "the job's time limit left no room for (method, estimated_seconds, seconds_left when it was to "
                    "start; stopped_after_seconds for one that started but was stopped before an epoch that would "
                    "have ended too late), and those that cannot clean this model at all (method, reason: fst where "
                    "the model has no linear classifier layer, anp where it has no BatchNorm)",
        examples=[{"chosen": "sau", "reason": "sau is the first candidate that kept clean accuracy on the selection "
                   "set within 2.0 points of the suspect's 90.80 %", "budget": 2.0, "suspect_selection_acc": 90.8,
                   "selection_images": 250, "trained_on": 2250,
                   "candidates": [{"method": "nad", "selection_acc": 82.8, "selection_lost": 31,
                                   "selection_gained": 11, "selection_gap_se": 2.54, "seconds": 190.2,
                                   "measured": {"acc": 78.1, "acc_non_target": 78.3, "asr": 4.4,
                                                "asr_without_trigger": 3.9}},
                                  {"method": "sau", "selection_acc": 87.6, "selection_lost": 16,
                                   "selection_gained": 8, "selection_gap_se": 1.95, "seconds": 290.5,
                                   "measured": {"acc": 82.2, "acc_non_target": 82.4, "asr": 1.6,
                                                "asr_without_trigger": 1.2}}],
                   "skipped": []}],
    )
    resampling: dict[str, Any] | None = Field(
        default=None,
        description="the suspect's resampling sign, measured on the clean training images: share, the percent of "
                    "them whose prediction moved into one class, label, when shifted half a pixel; images; "
                    "threshold; fired (share at least threshold: a backdoor keyed to resampling, a warp, may be "
                    "there; every cleansed model is then measured again, and one that still shows it into label is "
                    "warned of); note, the same in words; sau_warp, the warp strength sau ran with (the user's, or "
                    "when left unset 1 where the sign fired, else 0; null when sau did not run)",
        examples=[{"share": 89.4, "label": 0, "images": 2500, "threshold": 50.0, "fired": True,
                   "note": "89.4 % of the 2500 clean images moved into class 0 when shifted half a pixel, at least "
                           "50 %: a backdoor keyed to resampling (a warp) may be there", "sau_warp": 1.0}],
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what clean-data signals say about the cleansed model, when they say the backdoor may have "
                    "survived (sau: its last run's shared loss ended saturated, or was for most of its epochs; any "
                    "method: it still shows the suspect's resampling sign), and clean data that left classes out",
        examples=[[]],
    )
    device: str | None = Field(default=None, description="the device the job ran on", examples=["cuda"])
    timings: dict[str, float] = Field(
        description="seconds spent in each stage",
        examples=[{"load": 0.4, "evaluate_before": 3.1, "teacher": 60.2, "student": 121.7,
                   "evaluate_after": 3.0, "total": 188.4}],
    )
