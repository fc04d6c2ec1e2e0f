"""The `nad` command on real files: attack, evaluate, subset and sanitize, with their reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import free_port
from test_hostile_files import _png, _zip

from conftest import DIGITS_TRIGGER, digits_arrays
from core.cli import main
from core.client import Client, ServiceError
from core.engine.commands import ProgressBar, parse_trigger
from core.engine.events import Event

TRIGGER = json.dumps(DIGITS_TRIGGER)
UNREADABLE = "/proc/self/mem"  # opens, then fails to read (EIO): an OSError that names no file


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    x, y = digits_arrays()
    path = tmp_path_factory.mktemp("cli") / "digits.npz"
    np.savez(path, x=x[:400], y=y[:400])
    return path


def test_attack_then_evaluate(digits_npz, tmp_path, capsys):
    model = tmp_path / "bd.safetensors"
    assert main(["attack", "--arch", "wrn-16-1", "--data", str(digits_npz), "--trigger", TRIGGER,
                 "--target-label", "0", "--epochs", "1", "--input-size", "16", "--out", str(model)]) == 0
    assert model.exists()
    report = tmp_path / "reports" / "metrics.json"  # a folder that does not exist yet is made
    assert main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(model),
                 "--test-data", str(digits_npz), "--input-size", "16", "--trigger", TRIGGER, "--target-label", "0",
                 "--report", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert set(metrics) >= {"acc", "acc_non_target", "asr", "per_class_acc"}
    assert "ASR" in capsys.readouterr().out


def test_evaluate_refuses_folders_of_fewer_classes_than_the_model_has(digits_backdoor, tmp_path, capsys):
    """Sorted folder names number the classes only when every class has a folder: a 10-class model measured
    on folders 3 and 7 alone would have had them read as classes 0 and 1."""
    archive = _zip(tmp_path / "two-classes.zip", {"3/0.png": _png(0), "7/0.png": _png(1)})
    assert main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint",
                 str(digits_backdoor.checkpoint), "--test-data", str(archive), "--input-size", "16"]) == 2
    assert "the test data has 2 classes but the model has 10" in capsys.readouterr().err


def test_sanitize_writes_checkpoint_report_and_table(digits_backdoor, tmp_path, capsys):
    out, report = tmp_path / "clean.safetensors", tmp_path / "report.json"
    code = main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--input-size", "16",
                 "--checkpoint", str(digits_backdoor.checkpoint), "--clean-data", str(digits_backdoor.clean),
                 "--test-data", str(digits_backdoor.test), "--trigger", TRIGGER, "--target-label", "0",
                 "--teacher-epochs", "1", "--epochs", "1", "--lr", "0.01", "--betas", "500,1000,1000",
                 "--layers", "block1,block2,block3", "--nad-sam-rho", "0.5", "--no-nad-refit-bias", "--out", str(out),
                 "--report", str(report)])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    for key in ("before", "after"):
        assert {"acc", "asr", "per_class_acc"} <= set(data[key])
    assert data["params"]["epochs"] == 1 and data["params"]["nad_sam_rho"] == 0.5
    assert data["params"]["nad_refit_bias"] is False and data["bias_shift"] is None
    assert data["history"] and data["timings"]["total"] > 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "ASR" in printed
    after = next(line.split() for line in printed.splitlines() if line.startswith("after"))
    assert after[1:] == [f"{data['after'][key]:.2f}" for key in ("acc", "acc_non_target", "asr", "asr_without_trigger")]
    # The default method is auto: what it kept, and why, is printed as well as reported.
    assert f"auto kept {data['auto']['chosen']}: {data['auto']['reason']}" in printed
    # The suspect's resampling sign is printed too.
    assert f"resampling sign: {data['resampling']['note']}" in printed


def test_sanitize_prints_the_reports_warnings(digits_backdoor, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("core.engine.sau.SATURATED", -1.0)  # any sau run warns
    report = tmp_path / "report.json"
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--input-size", "16",
                 "--checkpoint", str(digits_backdoor.checkpoint), "--clean-data", str(digits_backdoor.clean),
                 "--method", "sau", "--sau-epochs", "1", "--sau-batch-size", "32", "--sau-anchor-epochs", "1",
                 "--sau-warp", "0.5", "--out", str(tmp_path / "clean.safetensors"), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["params"]["sau_anchor_epochs"] == 1 and data["params"]["sau_warp"] == 0.5
    assert data["resampling"]["sau_warp"] == 0.5, "a warp strength the user gave is not second-guessed"
    assert len(data["warnings"]) == 1
    assert f"warning: {data['warnings'][0]}" in capsys.readouterr().out


def test_subset_is_stratified(digits_npz, tmp_path):
    out = tmp_path / "part.npz"
    assert main(["subset", str(digits_npz), "--fraction", "0.25", "--input-size", "16", "--out", str(out)]) == 0
    with np.load(out) as part:
        assert len(part["y"]) == pytest.approx(100, abs=10)
        assert set(part["y"].tolist()) == set(range(10))


def test_subset_makes_its_folder_and_says_where_the_file_is(digits_npz, tmp_path, capsys):
    """`nad subset ... --out var/clean.npz`, as the README has it, on a clone with no var/ yet; numpy adds .npz to a
    name without it, and the printed path must be the file's."""
    out = tmp_path / "var" / "new" / "part"
    assert main(["subset", str(digits_npz), "--fraction", "0.25", "--input-size", "16", "--out", str(out)]) == 0
    written = out.with_name("part.npz")
    assert written.is_file() and capsys.readouterr().out.rstrip().endswith(f"-> {written}")


def test_outputs_that_cannot_be_written_are_refused_before_any_work(digits_backdoor, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("core.engine.sanitize.sanitize", lambda *args, **kwargs: pytest.fail("the job ran"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    job = ["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(digits_backdoor.checkpoint),
           "--clean-data", str(digits_backdoor.clean)]
    assert main([*job, "--out", str(tmp_path / "clean.safetensors"), "--report", str(blocker / "report.json")]) == 2
    assert f"cannot make the folder for {blocker / 'report.json'}" in capsys.readouterr().err
    assert main([*job, "--out", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; name the file to write" in capsys.readouterr().err
    assert not (tmp_path / "clean.safetensors").exists()
    # nad submit too, before it uploads anything (nothing listens at this URL: it is never asked).
    submit = ["submit", str(digits_backdoor.checkpoint), str(digits_backdoor.clean), "--params", "{}",
              "--url", "http://127.0.0.1:9"]
    assert main([*submit, "--out", str(blocker / "model.safetensors")]) == 2
    assert f"cannot make the folder for {blocker / 'model.safetensors'}" in capsys.readouterr().err


def test_nad_submit_refuses_a_missing_file_or_params_that_are_no_json_object_before_it_uploads(
        digits_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("core.client.Client.submit", lambda *args, **kwargs: pytest.fail("it uploaded"))
    none, padded = tmp_path / "none.pt", tmp_path / "padded.json"
    padded.write_text("{" + " " * (1 << 20) + "}")  # an object, but past what the service takes
    wide = tmp_path / "wide.json"  # fewer characters than the limit, more bytes: the service counts bytes
    wide.write_text('{"name": "' + "é" * (1 << 19) + '"}', encoding="utf-8")
    for files, params, said in (((none, digits_npz), "{}", f"{none}: no such file"),
                                ((digits_npz, digits_npz, "--test-data", none), "{}", f"{none}: no such file"),
                                ((digits_npz, digits_npz), "{bad", "--params is not JSON: Expecting property name"),
                                ((digits_npz, digits_npz), "[1]", "--params is not a JSON object of parameters"),
                                ((digits_npz, digits_npz), f"@{none}", f"cannot read {none}: No such file"),
                                ((digits_npz, digits_npz), f"@{digits_npz}", f"{digits_npz} is not JSON"),
                                ((digits_npz, digits_npz), f"@{padded}", f"{padded} is larger than 1,048,576 bytes"),
                                ((digits_npz, digits_npz), f"@{wide}", f"{wide} is larger than 1,048,576 bytes"),
                                ((digits_npz, digits_npz), f"@{UNREADABLE}", f"cannot read {UNREADABLE}: Input")):
        out = tmp_path / "new" / "clean.safetensors"
        assert main(["submit", *map(str, files), "--params", params, "--out", str(out),
                     "--url", "http://127.0.0.1:9"]) == 2
        assert f"nad: error: {said}" in capsys.readouterr().err, (files, params)
        assert not out.parent.exists(), "a refused submit made its output folder"


def test_a_missing_input_or_a_fraction_out_of_range_is_refused_with_a_message(digits_npz, tmp_path, capsys):
    none = tmp_path / "none.pt"
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(none),
                 "--clean-data", str(digits_npz), "--out", str(tmp_path / "clean.safetensors")]) == 2
    assert f"nad: error: {none}: no such file" in capsys.readouterr().err
    assert main(["subset", str(none), "--fraction", "0.5", "--out", str(tmp_path / "part.npz")]) == 2
    assert f"{none}: no such file" in capsys.readouterr().err
    for fraction in ("1.5", "5%"):
        with pytest.raises(SystemExit) as refused:
            main(["subset", str(digits_npz), "--fraction", fraction, "--out", str(tmp_path / "part.npz")])
        assert refused.value.code == 2 and f"{fraction} is not between 0 and 1" in capsys.readouterr().err
    padded = tmp_path / "padded.json"  # a trigger, but no trigger file is this big: /dev/zero would be read forever
    padded.write_text('{"type": "badnets"' + " " * (1 << 20) + "}")
    for trigger, said in ((str(none), f"cannot read {none}: No such file or directory"),
                          ("{bad", "not a usable trigger: Expecting property name"),
                          ('{"type": "badnets", "pattern": "missing.png"}', "cannot read missing.png"),
                          ('{"type": "square"}', "not a usable trigger"),
                          (str(padded), f"{padded} is larger than 1,048,576 bytes"),
                          (UNREADABLE, f"cannot read {UNREADABLE}: Input/output error")):
        with pytest.raises(SystemExit) as refused:
            main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(digits_npz),
                  "--test-data", str(digits_npz), "--trigger", trigger, "--target-label", "0"])
        assert refused.value.code == 2 and said in capsys.readouterr().err, trigger


def _pipe(text: str) -> str:
    """A pipe holding `text`, named as bash's process substitution names one (/dev/fd/N)."""
    out, into = os.pipe()
    os.write(into, text.encode())
    os.close(into)
    return f"/dev/fd/{out}"


def test_json_files_may_be_pipes_as_process_substitution_makes_them(digits_npz, monkeypatch):
    """`--trigger <(...)` and `--params @<(jq ...)` name a pipe: it is read as it comes, not refused for not
    being a regular file."""
    assert parse_trigger(_pipe(TRIGGER)) == parse_trigger(TRIGGER)
    sent = {}
    monkeypatch.setattr("core.client.Client.submit", lambda self, files, params: sent.update(params) or {"id": "x"})
    monkeypatch.setattr("core.client.Client.wait",
                        lambda self, job_id: {"id": job_id, "status": "failed", "error": "stop"})
    params = _pipe('{"method": "sau"}')
    assert main(["submit", str(digits_npz), str(digits_npz), "--params", f"@{params}",
                 "--url", "http://127.0.0.1:9"]) == 1
    assert sent == {"method": "sau"}


def test_a_service_that_stays_unreachable_is_given_up_on_saying_how_to_follow_the_job():
    """`nad submit` asks again through a restart of the service (test_service_e2e.py), but not for ever."""
    client = Client(f"http://127.0.0.1:{free_port()}", "key")
    try:
        with pytest.raises(ServiceError, match=r"no answer about job abc for 0 s .*ask again with GET /jobs/abc"):
            client.wait("abc", interval=0.01, show_progress=False, patience=0.1)
    finally:
        client.close()


def test_user_errors_exit_2_with_a_message(digits_npz, tmp_path, capsys):
    code = main(["evaluate", "--arch", "vgg99", "--num-classes", "10", "--checkpoint", str(digits_npz),
                 "--test-data", str(digits_npz)])
    assert code == 2 and "unknown architecture 'vgg99'" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["postgresql+psycopg://nobody@127.0.0.1:1/none", "bogus://x", "not a url"])
def test_nad_keys_says_when_it_cannot_use_the_database(url):
    result = subprocess.run([sys.executable, "-m", "core.cli", "keys", "list"], capture_output=True, text=True,
                            env={"NAD_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parents[1])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("nad: error: cannot use the database of NAD_DATABASE_URL: ")
    assert "Traceback" not in result.stderr


def test_the_console_script_is_installed():
    nad = Path(sys.executable).with_name("nad")
    result = subprocess.run([str(nad), "--help"], capture_output=True, text=True, check=True)
    assert "sanitize" in result.stdout and "evaluate" in result.stdout


def test_attack_with_the_warp_trigger_plants_a_backdoor(tmp_path):
    """WaNet's warp changes no pixel much, yet a model poisoned with it must obey it: proof that `nad attack`
    makes the warping models of docs/results.md, and that evaluation applies the same field."""
    x, y = digits_arrays()
    order = np.random.default_rng(0).permutation(len(y))
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, x=x[order[:1300]], y=y[order[:1300]])
    np.savez(test, x=x[order[1300:]], y=y[order[1300:]])
    warp = json.dumps({"type": "warp", "grid_size": 4, "strength": 2.0, "seed": 0})
    model, report = tmp_path / "warp.safetensors", tmp_path / "metrics.json"
    assert main(["attack", "--arch", "wrn-16-1", "--data", str(train), "--trigger", warp, "--target-label", "0",
                 "--epochs", "15", "--input-size", "16", "--out", str(model)]) == 0
    assert main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(model),
                 "--test-data", str(test), "--input-size", "16", "--trigger", warp, "--target-label", "0",
                 "--report", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["asr"] > 80 and metrics["acc"] > 85, metrics


def test_the_progress_bar_shows_an_epoch_that_starts_without_the_percentage_moving(capsys):
    """sau's retry runs its epochs at the stage's end: the bar must still say which epoch it is in."""
    bar = ProgressBar()
    bar(Event("sau", 0.5, epoch=10, epochs=10, loss=12.3, lr=1e-4))
    bar(Event("sau", 0.5, epoch=1, epochs=10, step=1, steps=9))
    shown = capsys.readouterr().err
    bar.close()
    assert "sau 1/10" in shown


def test_the_progress_bar_shows_an_epochs_loss_and_lr_beside_that_epoch_only(capsys):
    """The loss and lr come with an epoch's last event; the next epoch's first step must not show them as its
    own (the student's lr 0.1 of epoch 2 read as epoch 3's, after the drop)."""
    bar = ProgressBar()
    bar(Event("student", 0.1, epoch=2, epochs=20, loss=1.5, lr=0.1))
    bar(Event("student", 0.11, epoch=3, epochs=20, step=1, steps=35))
    shown = capsys.readouterr().err.split("\r")
    bar.close()
    assert any("student 2/20" in line and "lr=0.1" in line for line in shown)
    assert all("lr=" not in line for line in shown if "student 3/20" in line), shown
