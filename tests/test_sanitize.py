"""The engine end to end on real data: a backdoored digits model is sanitized; ASR falls and ACC holds."""

import importlib.metadata
import json

import pytest
import torch
from pydantic import ValidationError

from api.schemas import Metrics
from conftest import read_metadata
from core.engine import training
from core.engine.checkpoints import sha256_file
from core.engine.errors import Cancelled, InputError
from core.engine.methods import recipes, stages
from core.engine.sanitize import JobFiles, load_model, sanitize
from core.params import SanitizeParams


def _files(case, tmp_path, **extra) -> JobFiles:
    return JobFiles(checkpoint=case.checkpoint, clean_data=case.clean, test_data=case.test,
                    out=tmp_path / "clean.safetensors", **extra)


def test_nad_removes_the_digits_backdoor_and_keeps_accuracy(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate(digits_backdoor.params)
    events = []
    report = sanitize(_files(digits_backdoor, tmp_path), params, on_event=events.append)
    before, after = report["before"], report["after"]
    assert before["asr"] > 90, "the fixture's model should carry the backdoor"
    assert after["asr"] < 10
    assert after["acc"] > before["acc"] - 5
    assert report["evaluation"]["test_source"] == "test_data"
    assert report["layers"] == ["block1", "block2", "block3"] and report["betas"] == [500, 1000, 1000]
    assert set(report["timings"]) >= {"load", "evaluate_before", "teacher", "student", "evaluate_after", "total"}
    stages = [(row["stage"], row["epoch"]) for row in report["history"]]
    assert stages == [("teacher", e) for e in range(1, 6)] + [("student", e) for e in range(1, 6)]
    assert all(row["at_loss"] > 0 for row in report["history"] if row["stage"] == "student")
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    meta = read_metadata(tmp_path / "clean.safetensors")
    assert meta["method"] == "nad" and meta["input_sha256"] == sha256_file(digits_backdoor.checkpoint)
    assert report["nad_version"] == meta["nad_version"] == importlib.metadata.version("nad-service")
    json.dumps(report)  # the report must be storable as it is
    assert set(report) <= set(Metrics.model_fields), "document the report's new keys in api/schemas.py's Metrics"


def test_finetune_returns_the_fine_tuned_teacher(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate({**digits_backdoor.params, "method": "finetune"})
    report = sanitize(_files(digits_backdoor, tmp_path), params)
    assert {row["stage"] for row in report["history"]} == {"teacher"}
    assert report["after"]["asr"] < report["before"]["asr"]
    assert read_metadata(tmp_path / "clean.safetensors")["method"] == "finetune"


def test_nad_is_deterministic_for_a_seed(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate({**digits_backdoor.params, "teacher_epochs": 1, "epochs": 1})
    first = sanitize(_files(digits_backdoor, tmp_path / "a"), params)
    second = sanitize(_files(digits_backdoor, tmp_path / "b"), params)
    assert first["after"] == second["after"] and first["history"] == second["history"]
    a = load_model(params, tmp_path / "a" / "clean.safetensors").state_dict()
    b = load_model(params, tmp_path / "b" / "clean.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nad_refits_the_students_bias_unless_told_not_to(digits_backdoor, tmp_path):
    """By default the student's classifier bias is refit to the clean images after its last epoch: the checkpoint
    differs from the authors' NAD (nad_refit_bias false, the same seed) in the head's bias alone, by the shift the
    report gives."""
    short = {**digits_backdoor.params, "teacher_epochs": 1, "epochs": 1}
    refit = sanitize(_files(digits_backdoor, tmp_path / "a"), SanitizeParams.model_validate(short))
    plain = sanitize(_files(digits_backdoor, tmp_path / "b"),
                     SanitizeParams.model_validate({**short, "nad_refit_bias": False}))
    assert plain["bias_shift"] is None and "refit_bias" not in plain["timings"]
    assert "refit_bias" in refit["timings"]
    shift = torch.tensor(refit["bias_shift"])
    assert len(shift) == 10 and shift.abs().max() > 0.01 and abs(float(shift.sum())) < 1e-3
    a = load_model(SanitizeParams.model_validate(short), tmp_path / "a" / "clean.safetensors").state_dict()
    b = load_model(SanitizeParams.model_validate(short), tmp_path / "b" / "clean.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "fc.bias")
    assert torch.allclose(a["fc.bias"], b["fc.bias"] + shift, atol=1e-3)


def test_a_supplied_teacher_is_used_instead_of_fine_tuning(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate({**digits_backdoor.params, "epochs": 1})
    report = sanitize(_files(digits_backdoor, tmp_path, teacher=digits_backdoor.checkpoint), params)
    assert report["teacher"] == "supplied"
    assert {row["stage"] for row in report["history"]} == {"student"}


def test_without_a_test_set_a_stratified_holdout_is_used_and_said(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate({**digits_backdoor.params, "teacher_epochs": 1, "epochs": 1})
    files = JobFiles(checkpoint=digits_backdoor.checkpoint, clean_data=digits_backdoor.clean,
                     out=tmp_path / "o.safetensors")
    report = sanitize(files, params)
    assert report["evaluation"]["test_source"] == "holdout"
    assert "hold-out" in report["evaluation"]["note"]
    assert report["evaluation"]["n_clean"] + report["evaluation"]["n_train"] == 500


def test_cancel_stops_between_epochs(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate(digits_backdoor.params)
    epochs_seen = []

    def watch(event):
        if event.loss is not None:
            epochs_seen.append(event.epoch)

    with pytest.raises(Cancelled):
        sanitize(_files(digits_backdoor, tmp_path), params, on_event=watch, should_stop=lambda: len(epochs_seen) >= 2)
    assert epochs_seen == [1, 2]
    assert not (tmp_path / "clean.safetensors").exists()


def test_cancel_is_honoured_between_the_stages_before_training(digits_backdoor, tmp_path):
    """Loading and measuring a large data set take minutes of their own: a cancel waits for neither's end."""
    params = SanitizeParams.model_validate(digits_backdoor.params)
    for asks, stage in ((1, "the first evaluation"), (2, "the resampling sign"), (3, "training")):
        stages, answers = [], iter([False] * (asks - 1) + [True])
        with pytest.raises(Cancelled, match=f"^cancelled before {stage}$"):
            sanitize(_files(digits_backdoor, tmp_path), params, on_event=lambda event, seen=stages: seen.append(
                event.stage), should_stop=lambda said=answers: next(said))
        assert "teacher" not in stages and not (tmp_path / "clean.safetensors").exists()


def test_wrong_class_count_is_an_input_error_naming_keys(digits_backdoor, tmp_path):
    params = SanitizeParams.model_validate({**digits_backdoor.params, "num_classes": 12, "target_label": 0})
    with pytest.raises(InputError, match="fc.weight"):
        sanitize(_files(digits_backdoor, tmp_path), params)


def test_clean_data_missing_a_class_folder_is_refused(tmp_path):
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from core.engine.sanitize import load_clean

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
    archive = tmp_path / "clean.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/0.png", buffer.getvalue())
        zf.writestr("dog/0.png", buffer.getvalue())
    params = SanitizeParams(arch="wrn-16-1", num_classes=3, input_size=8)
    with pytest.raises(InputError, match="2 classes but the model has 3"):
        load_clean(archive, params)
    named = SanitizeParams(arch="wrn-16-1", num_classes=3, input_size=8, classes=["cat", "cow", "dog"])
    assert load_clean(archive, named).labels.tolist() == [0, 2]


def test_fast_and_reference_modes_compute_the_same_thing():
    """`mode` changes memory layout and batch sizes, never the arithmetic: logits and one SGD step agree up to
    float rounding (convolutions sum in another order)."""
    from core.engine.models import build_model
    from core.engine.training import Execution, Normalization, Recipe, Watch, cross_entropy, train

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    results = []
    for mode in ("reference", "fast"):
        execution = Execution.for_mode(mode, torch.device("cpu"), 32)
        torch.manual_seed(1)
        model = execution.prepare(build_model("wrn-16-1", 10))
        train(model, images, labels, cross_entropy(model), Recipe(epochs=1, lr=0.1, batch_size=8), Normalization(),
              Watch("t", lambda e: None, lambda: False), execution)
        model.eval()
        with torch.no_grad():
            results.append((model(execution.inputs(images.float() / 255)), model.state_dict()))
    (ref_logits, ref_state), (fast_logits, fast_state) = results
    assert Execution.for_mode("fast", torch.device("cpu"), 32).channels_last
    assert torch.allclose(ref_logits, fast_logits, atol=1e-4)
    assert all(torch.allclose(ref_state[k].float(), fast_state[k].float(), atol=2e-4) for k in ref_state)


def test_evaluation_batches_of_larger_images_hold_as_many_pixels():
    """A batch of 256 images of 1024 x 1024 is 17 GB in WRN-16-1's first layer alone (256 x 16 channels x 1024^2
    x 4 bytes)."""
    from core.engine.training import Execution

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    sizes = (16, 32, 64, 224, 1024)
    assert [Execution.for_mode("fast", cpu, size).eval_batch for size in sizes] == [64, 64, 64, 5, 1]
    assert Execution.for_mode("fast", gpu, 128).eval_batch == 64
    assert Execution.for_mode("reference", cpu, 64).eval_batch == 16


def test_a_job_and_nad_evaluate_measure_in_batches_sized_for_their_images(tmp_path, monkeypatch):
    """The batch above is the one a job and `nad evaluate` measure with: sized for the job's input_size, not
    for 32 x 32 images (16 images of 128 x 128 on a CPU where 32 x 32 would give 64)."""
    import numpy as np

    from core.engine import sanitize as engine
    from core.engine.checkpoints import write_checkpoint
    from core.engine.models import build_model

    class Measured(Exception):
        pass

    def measure(model, evaluation, normalize, dev, execution):
        raise Measured(execution.eval_batch)

    monkeypatch.setattr(engine, "measure", measure)
    checkpoint, data = tmp_path / "model.safetensors", tmp_path / "data.npz"
    write_checkpoint(build_model("wrn-16-1", 2), checkpoint, {"arch": "wrn-16-1"})
    np.savez(data, x=np.zeros((8, 8, 8, 3), np.uint8), y=np.arange(8) % 2)
    params = SanitizeParams(arch="wrn-16-1", num_classes=2, input_size=128, method="finetune")
    with pytest.raises(Measured) as job:
        sanitize(JobFiles(checkpoint=checkpoint, clean_data=data, test_data=data, out=tmp_path / "out"), params)
    with pytest.raises(Measured) as evaluate:
        engine.evaluate_checkpoint(checkpoint, data, params)
    assert job.value.args == evaluate.value.args == (16,)


def test_nad_sam_rho_makes_the_students_steps_after_its_milestone_sharpness_aware():
    """FT-SAM's radius 2 by default, from the student's first milestone on, each such epoch costing two in the
    progress bar and in auto's estimates; 0 gives the authors' plain SGD; a radius outside 0 to 10 is refused."""
    params = SanitizeParams(arch="wrn-16-1", num_classes=10)
    student = recipes(params)["student"]
    assert (student.sam_rho, student.sam_from) == (2.0, 2)
    assert stages("nad", params, trains_teacher=True) == {"teacher": 10, "student": 20 + 18}
    assert stages("auto", params, trains_teacher=True)["nad/student"] == 38
    plain = params.model_copy(update={"nad_sam_rho": 0.0})
    assert recipes(plain)["student"].sam_rho == 0
    assert stages("nad", plain, trains_teacher=True) == {"teacher": 10, "student": 20}
    for bad in (-1.0, 11.0, float("nan"), float("inf")):
        with pytest.raises(ValidationError):
            SanitizeParams(arch="wrn-16-1", num_classes=10, nad_sam_rho=bad)


def test_the_sharpness_aware_steps_reach_the_training_loop_only_when_asked(digits_backdoor, tmp_path, monkeypatch):
    """One a batch in the student's epochs from its milestone (here the last of three), at the default radius 2;
    none with nad_sam_rho 0."""
    rhos = []
    step = training.sharpness_aware_gradients

    def counted(model, objective, inputs, labels, rho, execution):
        rhos.append(rho)
        step(model, objective, inputs, labels, rho, execution)

    monkeypatch.setattr(training, "sharpness_aware_gradients", counted)
    short = {"teacher_epochs": 1, "epochs": 3, "lr_milestones": [2]}
    digits_backdoor.sanitize(tmp_path / "plain.safetensors", nad_sam_rho=0.0, **short)
    assert rhos == []
    report = digits_backdoor.sanitize(tmp_path / "sharp.safetensors", **short)
    assert rhos == [2.0] * (report["evaluation"]["n_train"] // digits_backdoor.params["batch_size"])
