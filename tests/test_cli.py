"""The `nad` command on real files: attack, evaluate, subset and sanitize, with their reports."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import ROOT, StoodStill, free_port
from test_hostile_files import _png, _zip

from conftest import DIGITS_TRIGGER, digits_arrays
from core.cli import main
from core.client import UPLOAD_TRIES, Client, ServiceError
from core.engine.commands import ProgressBar, attack_milestones, parse_trigger, terminal_bar
from core.engine.errors import InputError
from core.engine.events import Event

TRIGGER = json.dumps(DIGITS_TRIGGER)
UNREADABLE = "/proc/self/mem"  # opens, then fails to read (EIO): an OSError that names no file
UNWRITABLE = "/proc/report.json"  # its folder exists, yet takes no new file, even from root (tests run as root)


def test_version_is_the_projects(capsys):
    """`nad --version` says pyproject.toml's version, as the API's OpenAPI description does (test_api)."""
    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert exit_code.value.code == 0 and capsys.readouterr().out == f"nad {project}\n"


def _as_terminal(monkeypatch) -> None:
    """Make the captured stderr a terminal, where progress bars are drawn: as a log's, pytest's is none. Called in
    the test itself: pytest puts its stream in sys.stderr after the fixtures ran."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def _job_files(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint and clean data that exist, for a run whose engine a test replaces."""
    checkpoint, clean = tmp_path / "model.safetensors", tmp_path / "clean.npz"
    checkpoint.write_text("weights")
    clean.write_text("data")
    return checkpoint, clean


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
    # The per-class rows line up in a terminal whatever the names: a wide character takes two columns.
    names = ["二", "zéro", *map(str, range(2, 10))]
    assert main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(model),
                 "--test-data", str(digits_npz), "--input-size", "16", "--classes", ",".join(names)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().split(" ")[0] in names]
    assert len(rows) == 10 and len({sum(2 if char == "二" else 1 for char in row) for row in rows}) == 1, rows


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
    # A folder that exists but takes no file (read-only, full): found by writing a file there, not by making it.
    assert main([*job, "--out", str(tmp_path / "clean.safetensors"), "--report", UNWRITABLE]) == 2
    assert f"nad: error: cannot write files in /proc, for {UNWRITABLE}: " in capsys.readouterr().err
    assert main([*submit, "--out", UNWRITABLE]) == 2
    assert f"nad: error: cannot write files in /proc, for {UNWRITABLE}: " in capsys.readouterr().err


def test_a_report_that_cannot_be_written_in_the_end_is_said_in_one_line_after_the_results(
        tmp_path, capsys, monkeypatch):
    """The folder was writable when the job began; the disk filled up while it ran."""
    result = {"evaluation": {"note": "measured"}, "auto": None, "resampling": None, "warnings": [],
              "before": {"acc": 90.0, "asr": 99.0}, "after": {"acc": 88.0, "asr": 2.0}}
    monkeypatch.setattr("core.engine.sanitize.sanitize", lambda *args, **kwargs: result)

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    checkpoint, clean = _job_files(tmp_path)
    monkeypatch.setattr(Path, "write_text", full)
    report = tmp_path / "report.json"
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint),
                 "--clean-data", str(clean), "--out", str(tmp_path / "clean.safetensors"),
                 "--report", str(report)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"nad: error: cannot write {report}: No space left on device\n"
    assert "after      88.00" in captured.out, "the results are printed all the same"


def test_a_checkpoint_or_subset_that_cannot_be_written_in_the_end_is_said_in_one_line(
        digits_npz, tmp_path, capsys, monkeypatch):
    """sanitize's checkpoint (written by the engine), attack's and subset's: a disk that filled up during the run
    ended each in a traceback."""

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    checkpoint, clean = _job_files(tmp_path)
    out = tmp_path / "clean.safetensors"

    def full_at_out(*args, **kwargs):  # as write_checkpoint raises it, naming the file (checkpoints.py)
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr("core.engine.sanitize.sanitize", full_at_out)
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint),
                 "--clean-data", str(clean), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"nad: error: cannot write {out}: No space left on device\n"
    monkeypatch.setattr("numpy.savez", full)
    part = tmp_path / "part.npz"
    assert main(["subset", str(digits_npz), "--fraction", "0.5", "--out", str(part)]) == 2
    assert capsys.readouterr().err.endswith(f"nad: error: cannot write {part}: No space left on device\n")
    monkeypatch.setattr("core.engine.checkpoints.save_file", full)
    model = tmp_path / "bd.safetensors"
    assert main(["attack", "--arch", "wrn-16-1", "--data", str(digits_npz), "--trigger", TRIGGER, "--target-label",
                 "0", "--epochs", "1", "--input-size", "8", "--out", str(model)]) == 2
    assert capsys.readouterr().err.endswith(f"nad: error: cannot write {model}: No space left on device\n")


def test_an_output_that_names_an_input_or_another_output_is_refused(digits_npz, tmp_path, capsys, monkeypatch):
    """One file written over another loses a checkpoint to its report, or the user's data to a result."""
    monkeypatch.setattr("core.engine.sanitize.sanitize", lambda *args, **kwargs: pytest.fail("the job ran"))
    monkeypatch.setattr("core.client.Client.submit", lambda *args, **kwargs: pytest.fail("it uploaded"))
    checkpoint, clean = _job_files(tmp_path)
    job = ["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint),
           "--clean-data", str(clean)]
    both = tmp_path / "both.safetensors"  # not there yet: two outputs may name it all the same
    (tmp_path / "link").symlink_to(tmp_path)
    for outputs, clash in ((("--out", both, "--report", tmp_path / "link" / both.name), "is named for two outputs"),
                           (("--out", both, "--report", clean), "is an input"),
                           (("--out", tmp_path / "sub" / ".." / checkpoint.name), "is an input")):
        assert main([*job, *map(str, outputs)]) == 2
        assert capsys.readouterr().err.startswith(f"nad: error: {outputs[-1]} {clash}"), outputs
    # the input named indirectly: relative to the working folder, or through the symlink
    monkeypatch.chdir(tmp_path)
    through_link = str(tmp_path / "link" / checkpoint.name)
    for flag, indirect, output in (("--clean-data", clean.name, ["--out", str(both), "--report", str(clean)]),
                                   ("--checkpoint", through_link, ["--out", str(checkpoint)])):
        named = [indirect if previous == flag else value for previous, value in zip(["", *job], job, strict=False)]
        assert main([*named, *output]) == 2
        assert capsys.readouterr().err.startswith(f"nad: error: {output[-1]} is an input")
    assert not both.exists() and checkpoint.read_text() == "weights" and clean.read_text() == "data"
    copy = tmp_path / "digits.npz"
    copy.write_bytes(digits_npz.read_bytes())
    for out in (copy, copy.with_suffix("")):  # subset adds .npz: `--out digits` is digits.npz too
        assert main(["subset", str(copy), "--fraction", "0.5", "--out", str(out)]) == 2
        assert f"{copy} is an input" in capsys.readouterr().err
    assert copy.read_bytes() == digits_npz.read_bytes()
    assert main(["submit", str(checkpoint), str(clean), "--params", "{}", "--url", "http://127.0.0.1:9",
                 "--out", str(checkpoint)]) == 2
    assert f"{checkpoint} is an input" in capsys.readouterr().err


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


def test_an_input_that_fails_to_read_is_not_said_as_a_failed_write(tmp_path, capsys):
    """A read that fails after its open names no file: it was said as `--out` that could not be written."""
    _, clean = _job_files(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", UNREADABLE,
                 "--clean-data", str(clean), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\nnad: error: an input could not be read, or {out} written: Input/output error\n"), err


def test_an_input_that_names_itself_in_its_read_error_is_said_as_unreadable(tmp_path, capsys, monkeypatch):
    """An input the engine may not read names its file, as the checkpoint's failed write names --out: said as
    that input unreadable, not as a write of it that failed."""
    checkpoint, clean = _job_files(tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(checkpoint))

    monkeypatch.setattr("core.engine.sanitize.sanitize", denied)
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint),
                 "--clean-data", str(clean), "--out", str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err == f"nad: error: cannot read {checkpoint}: Permission denied\n"


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
    huge = tmp_path / "huge.npy"  # 128 bytes whose header declares 112 GiB: numpy would allocate it first
    with huge.open("wb") as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (200000, 200000, 3)})
    padded = tmp_path / "padded.json"  # a trigger, but no trigger file is this big: /dev/zero would be read forever
    padded.write_text('{"type": "badnets"' + " " * (1 << 20) + "}")
    failing = tmp_path / "failing.png"  # a pattern file that opens, then fails to read: its error names no file
    failing.symlink_to(UNREADABLE)
    for trigger, said in ((str(none), f"cannot read {none}: No such file or directory"),
                          ("{bad", "not a usable trigger: Expecting property name"),
                          ('{"type": "badnets", "pattern": "missing.png"}',
                           "argument --trigger: cannot read missing.png: No such file or directory ("),
                          ('{"type": "blend", "alpha": 0.1, "pattern": "gone.npz:noise"}',
                           "argument --trigger: cannot read gone.npz: No such file or directory ("),
                          ('{"type": "square"}', "not a usable trigger"),
                          ('{"type": "badnets"}',
                           "not a usable trigger: badnets.pattern: Field required; badnets.position: Field required"),
                          (str(padded), f"{padded} is larger than 1,048,576 bytes"),
                          (json.dumps({"type": "blend", "alpha": 0.1, "pattern": str(huge)}),
                           f"the pattern file {huge} declares an array too large to be a pattern"),
                          (UNREADABLE, f"cannot read {UNREADABLE}: Input/output error"),
                          (json.dumps({"type": "badnets", "pattern": str(failing)}),
                           f"cannot read {failing}: Input/output error")):
        with pytest.raises(SystemExit) as refused:
            main(["evaluate", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(digits_npz),
                  "--test-data", str(digits_npz), "--trigger", trigger, "--target-label", "0"])
        err = capsys.readouterr().err  # one line: not argparse's usage block, nor pydantic's three lines a field
        assert refused.value.code == 2 and said in err and err.count("\n") == 1, (trigger, err)
        assert err.startswith("nad evaluate: error: argument --trigger: ") and "nad evaluate --help" in err


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


def test_nad_submit_sends_key_over_nad_api_key_and_follows_a_cancelled_job_to_its_end(digits_npz, capsys, monkeypatch):
    """`--key` overrides NAD_API_KEY (README), sent as `Authorization: Bearer`; an upload has no write timeout. A
    job cancelled meanwhile has finished: said, exit 1, not followed for ever."""
    sent = []
    monkeypatch.setenv("NAD_API_KEY", "nad_env_secret")
    monkeypatch.setattr(Client, "submit", lambda self, files, params: sent.append(self.http) or {"id": "abc"})
    for flag in (["--key", "nad_flag_secret"], []):
        answers = iter([{"id": "abc", "status": "cancelled", "error": None, "progress": {"percent": 40}}])
        monkeypatch.setattr(Client, "job", lambda self, job_id, answers=answers: next(answers))
        assert main(["submit", str(digits_npz), str(digits_npz), "--params", "{}", "--url", "http://127.0.0.1:9",
                     *flag]) == 1
        assert capsys.readouterr().err.endswith("\njob abc cancelled: no result\n")
    assert [http.headers["authorization"] for http in sent] == ["Bearer nad_flag_secret", "Bearer nad_env_secret"]
    assert sent[0].timeout.write is None and sent[0].timeout.read == sent[0].timeout.connect > 0


def test_a_service_that_stays_unreachable_is_given_up_on_saying_how_to_follow_the_job(monkeypatch):
    """`nad submit` asks again through a restart of the service (test_service_e2e.py), but not for ever: for
    `patience` seconds from the first failure."""
    clock = StoodStill()
    monkeypatch.setattr("core.client.time", clock)
    client = Client(f"http://127.0.0.1:{free_port()}", "key")
    try:
        with pytest.raises(ServiceError, match=r"no answer about job abc for 60 s .*ask again with GET /jobs/abc"):
            client.wait("abc", interval=2, show_progress=False, patience=60)
    finally:
        client.close()
    assert clock.now == 60


class ScriptedService(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next of `script`: (status, JSON body), (status, bytes, headers), or None
    to close the connection unanswered; a real HTTP exchange for the client. `asked` records each request's
    method, path and Idempotency-Key."""

    script: list = []
    asked: list = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def _answer(self) -> None:
        self.asked.append((self.command, self.path, self.headers.get("Idempotency-Key")))
        answer = self.script.pop(0)
        if answer is None:
            self.close_connection = True
            return
        status, body, headers = answer if len(answer) == 3 else (*answer, {})
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json" if status < 400 else "application/problem+json",
                            **headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch) -> Iterator[Client]:
    """A client of a ScriptedService; the test fills `ScriptedService.script`."""
    monkeypatch.setattr(ScriptedService, "asked", [])
    monkeypatch.setattr(ScriptedService, "script", [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(f"http://127.0.0.1:{server.server_port}", "key")
    yield client
    client.close()
    server.shutdown()
    server.server_close()


def test_a_service_answering_502_503_or_504_is_asked_again_any_other_error_is_said(scripted):
    """A proxy in front of a restarting API answers 502 or 503, a gateway out of patience 504: asked again. A
    404 (the job deleted meanwhile) is said at once, with the problem's detail."""
    job = {"id": "abc", "status": "succeeded", "progress": {"percent": 100, "stage": "done"}}
    problem = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no job abc"}
    ScriptedService.script.extend([(502, {}), (503, {}), (504, {}), (200, job), (404, problem)])
    assert scripted.wait("abc", interval=0.01, show_progress=False, patience=60) == job
    with pytest.raises(ServiceError, match="no job abc"):
        scripted.wait("abc", interval=0.01, show_progress=False, patience=60)
    assert [path for _, path, _ in ScriptedService.asked] == ["/jobs/abc"] * 5


def test_an_upload_cut_off_before_its_answer_is_sent_again_under_the_same_idempotency_key(
    scripted, digits_npz, monkeypatch
):
    """The key lets the service answer a repeated upload with the job the first one made, never a second job;
    a connection that keeps failing is given up on after UPLOAD_TRIES, and an answer, even an error, is final."""
    clock = StoodStill()  # its waits, of minutes, take no time
    monkeypatch.setattr("core.client.time", clock)
    files = {"model": digits_npz, "clean_data": digits_npz}
    ScriptedService.script.extend([None, (202, {"id": "abc"})])
    assert scripted.submit(files, {}, show_progress=False) == {"id": "abc"}
    (_, path, key), again = ScriptedService.asked
    assert path == "/sanitize" and key and again == ("POST", "/sanitize", key)

    ScriptedService.script.extend([None] * UPLOAD_TRIES)
    with pytest.raises(ServiceError, match="could not reach"):
        scripted.submit(files, {}, show_progress=False)
    ScriptedService.script.append((500, {"title": "Internal Server Error", "status": 500, "detail": "a bug"}))
    with pytest.raises(ServiceError, match="a bug"):
        scripted.submit(files, {}, show_progress=False)
    assert len(ScriptedService.asked) == 2 + UPLOAD_TRIES + 1 and not ScriptedService.script
    assert clock.now == 2 + sum(2 * attempt for attempt in range(1, UPLOAD_TRIES))  # a pause before each try again


def test_an_unavailable_service_is_waited_out_for_the_upload_the_metrics_and_the_model(
    scripted, digits_npz, tmp_path, monkeypatch, capsys
):
    """Its database out or its queue, the service answers 503 (README): `nad submit` said so and stopped,
    before the upload and after a job that had succeeded alike. Now it asks again, the upload under the same
    Idempotency-Key."""
    monkeypatch.setattr("core.client.time", StoodStill())  # its waits, of minutes, take no time
    unavailable = (503, {"title": "Service Unavailable", "status": 503, "detail": "the job database is out"})
    model = b"the checkpoint"
    ScriptedService.script.extend([unavailable, (202, {"id": "abc"}), unavailable, (200, {"after": {}}),
                                   (502, {}), (200, model, {"ETag": f'"{hashlib.sha256(model).hexdigest()}"'})])
    assert scripted.submit({"model": digits_npz}, {}, show_progress=False) == {"id": "abc"}
    assert capsys.readouterr().err == ("503 Service Unavailable: the job database is out; sending the upload again "
                                       "in 10 s\n")  # not silence while it waits
    assert scripted.metrics("abc") == {"after": {}}
    destination = scripted.download("abc", tmp_path / "cleansed.safetensors", show_progress=False)
    assert destination.read_bytes() == model
    (_, _, key), again, *rest = ScriptedService.asked
    assert key and again == ("POST", "/sanitize", key)
    assert [path for _, path, _ in rest] == ["/jobs/abc/metrics"] * 2 + ["/jobs/abc/model"] * 2


def test_a_download_that_does_not_match_its_etag_is_refused_and_leaves_nothing(scripted, tmp_path):
    etag = f'"{hashlib.sha256(b"the checkpoint").hexdigest()}"'
    ScriptedService.script.append((200, b"the checkpoint, damaged", {"ETag": etag}))
    destination = tmp_path / "cleansed.safetensors"
    with pytest.raises(ServiceError, match="arrived damaged"):
        scripted.download("abc", destination, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_user_errors_exit_2_with_a_message(digits_npz, tmp_path, capsys):
    code = main(["evaluate", "--arch", "vgg99", "--num-classes", "10", "--checkpoint", str(digits_npz),
                 "--test-data", str(digits_npz)])
    assert code == 2 and "unknown architecture 'vgg99'" in capsys.readouterr().err


def test_invalid_parameters_are_said_in_one_line_by_their_flags(tmp_path, capsys):
    checkpoint, clean = _job_files(tmp_path)
    model = ["--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint)]
    sanitize = ["sanitize", *model, "--clean-data", str(clean), "--out", str(tmp_path / "out.safetensors")]
    evaluate = ["evaluate", *model, "--test-data", str(clean)]
    for command, said in (([*sanitize, "--batch-size", "0", "--epochs", "-1"],
                           ("--epochs: Input should be greater than or equal to 1",
                            "--batch-size: Input should be greater than or equal to 1")),
                          ([*sanitize, "--method", "fst", "--teacher", str(checkpoint)],
                           ("--teacher: method fst uses no teacher",)),
                          ([*sanitize, "--trigger", "nad-grid"], ("a trigger needs target_label",)),
                          ([*evaluate, "--trigger", "nad-grid"], ("a trigger needs target_label",))):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("nad: error: ") and err.count("\n") == 1, err
        assert all(part in err for part in said) and "Value error" not in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_nad_attack_refuses_numbers_out_of_range(digits_npz, tmp_path, capsys):
    attack = ["attack", "--arch", "wrn-16-1", "--data", str(digits_npz), "--trigger", TRIGGER, "--input-size", "16",
              "--out", str(tmp_path / "bd.safetensors")]
    for flag, value, said in (("--target-label", "-1", "-1 is below 0"), ("--epochs", "0", "0 is below 1"),
                              ("--batch-size", "0", "0 is below 1"), ("--lr", "-1", "-1 is not a positive number"),
                              ("--lr", "nan", "nan is not a positive number"), ("--input-size", "0", "0 is below 8"),
                              ("--input-size", "100000", "100000 is above 1024"),
                              ("--poison-rate", "nan", "nan is not above 0 and at most 1"),
                              ("--poison-rate", "inf", "inf is not above 0 and at most 1"),
                              ("--poison-rate", "0", "0 is not above 0 and at most 1")):
        with pytest.raises(SystemExit) as refused:
            main([*attack, "--target-label", "0", flag, value])
        assert refused.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err
    # Only the data says how many classes there are: 10 here, so 10 is one too many.
    assert main([*attack, "--target-label", "10"]) == 2
    said = f"nad: error: --target-label 10 is not a class of {digits_npz}: it has 10, 0 to 9\n"
    assert capsys.readouterr().err == said
    assert not (tmp_path / "bd.safetensors").exists()


def test_number_bounds_are_taken_as_documented_a_whole_poison_rate_a_fraction_above_0_a_json_file_at_the_cap(
        tmp_path):
    """--poison-rate may be the whole (1: every image poisoned), --fraction of `nad subset` must keep something
    (0 would write an empty archive) and not all (1 is the archive itself), and a trigger or params file of
    exactly PARAMS_LIMIT bytes is read, as the service takes a `params` field of that size; one byte more is not."""
    import argparse

    from core.engine.commands import _fraction, _rate, small_json_file
    from core.params import PARAMS_LIMIT

    assert _rate("1") == 1.0 and _fraction("0.5") == 0.5
    for refused, text in ((_rate, "0"), (_fraction, "0"), (_fraction, "1")):
        with pytest.raises(argparse.ArgumentTypeError):
            refused(text)
    at_cap = tmp_path / "params.json"
    at_cap.write_text("{}" + " " * (PARAMS_LIMIT - 2))
    assert small_json_file(at_cap, "advice").startswith("{}")
    at_cap.write_text("{}" + " " * (PARAMS_LIMIT - 1))
    with pytest.raises(ValueError, match="larger than 1,048,576 bytes; advice"):
        small_json_file(at_cap, "advice")


def test_nad_attack_trains_a_one_epoch_run_at_the_lr_it_was_given(digits_npz, tmp_path, monkeypatch):
    """Milestones at half and three quarters of one epoch were both epoch 0: it trained at a hundredth of --lr."""
    recipes = []

    def train(arch, data, poisoning, recipe, *args, **kwargs):
        recipes.append(recipe)
        raise InputError("stop here")

    monkeypatch.setattr("core.engine.attack.train_backdoored", train)
    assert main(["attack", "--arch", "wrn-16-1", "--data", str(digits_npz), "--trigger", TRIGGER,
                 "--target-label", "0", "--epochs", "1", "--lr", "0.05", "--input-size", "16",
                 "--out", str(tmp_path / "bd.safetensors")]) == 2
    assert recipes[0].lr_at(0) == 0.05
    assert attack_milestones(1) == () and attack_milestones(2) == (1,) and attack_milestones(30) == (15, 22)


def test_subset_refuses_an_input_size_out_of_range(digits_npz, tmp_path, capsys):
    """It decodes the whole archive at that size: 100,000 pixels a side would take more memory than any machine."""
    for size, said in (("0", "0 is below 8"), ("-3", "-3 is below 8"), ("100000", "100000 is above 1024")):
        with pytest.raises(SystemExit) as refused:
            main(["subset", str(digits_npz), "--fraction", "0.5", "--input-size", size,
                  "--out", str(tmp_path / "part.npz")])
        assert refused.value.code == 2 and f"argument --input-size: {said}" in capsys.readouterr().err


def test_lists_of_numbers_that_are_not_are_refused_without_naming_a_helper(digits_npz, tmp_path, capsys):
    model = ["--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(digits_npz)]
    for command, said in ((["evaluate", *model, "--test-data", str(digits_npz), "--mean", "a,b"],
                           "argument --mean: a,b is not a comma-separated list of numbers"),
                          (["sanitize", *model, "--clean-data", str(digits_npz), "--lr-milestones", "x",
                            "--out", str(tmp_path / "o.safetensors")],
                           "argument --lr-milestones: x is not a comma-separated list of whole numbers")):
        with pytest.raises(SystemExit) as refused:
            main(command)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and said in err and "invalid" not in err, err


@pytest.mark.parametrize("url", ["http://[::1", "ftp://127.0.0.1", "127.0.0.1:8000"])
def test_nad_submit_refuses_a_service_url_it_cannot_use(digits_npz, url, capsys, monkeypatch):
    monkeypatch.setattr("core.client.Client.submit", lambda *args, **kwargs: pytest.fail("it uploaded"))
    assert main(["submit", str(digits_npz), str(digits_npz), "--params", "{}", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nad: error: the service URL {url} is not usable: ") and err.count("\n") == 1


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("NAD_API_PORT", "abc", "NAD_API_PORT: Input should be a valid integer, unable to parse string as an integer"),
    ("NAD_API_PORT", "65536", "NAD_API_PORT: Input should be less than or equal to 65535"),  # uvicorn: a traceback
    # empty: RabbitMQ on localhost to Celery, a queue no worker listens to, the current folder
    ("NAD_BROKER_URL", "", "NAD_BROKER_URL: String should have at least 1 character"),
    ("NAD_QUEUE", "", "NAD_QUEUE: String should have at least 1 character"),
    ("NAD_STORAGE_DIR", "", "NAD_STORAGE_DIR: an empty path; name the folder for the jobs' files"),
])
def test_nad_keys_says_which_setting_of_the_environment_is_wrong(tmp_path, variable, value, said):
    result = subprocess.run([sys.executable, "-m", "core.cli", "keys", "list"], capture_output=True, text=True,
                            env={variable: value, "NAD_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
                                 "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parents[1])
    assert result.returncode == 2 and result.stderr == f"nad: error: {said}\n"


def test_a_key_name_is_one_printable_line_the_database_can_keep(capsys):
    """An empty name, one over the 100 characters kept (PostgreSQL refused it as a database it could not use)
    or one that breaks `nad keys list`'s line a key."""
    for name in ("", "x" * 101, "two\nlines"):
        with pytest.raises(SystemExit) as refused:
            main(["keys", "create", "--name", name])
        assert refused.value.code == 2 and "a key's name is 1 to 100 printable characters" in capsys.readouterr().err


def test_nad_keys_creates_revokes_and_lists_keys_on_a_new_database(tmp_path, capsys, nad_environment):
    """`nad keys` makes its database's tables itself; a name of 100 characters is kept, a key revoked is listed
    as revoked, and revoking a key that is not live fails, naming it."""
    nad_environment(NAD_DATABASE_URL=f"sqlite:///{tmp_path / 'keys.db'}")
    name = "x" * 100
    assert main(["keys", "create", "--name", name]) == 0
    key_id = capsys.readouterr().out.splitlines()[-1].split("_")[1]
    assert main(["keys", "revoke", key_id]) == 0 and capsys.readouterr().out == f"revoked key {key_id}\n"
    assert main(["keys", "revoke", key_id]) == 2
    assert capsys.readouterr().err == f"nad: error: no live key {key_id}\n"
    assert main(["keys", "list"]) == 0
    (listed,) = capsys.readouterr().out.splitlines()
    assert listed.startswith(f"{key_id}  ") and " revoked 20" in listed and listed.endswith(f"  {name}")


@pytest.mark.parametrize(("url", "said"), [
    ("postgresql+psycopg://nobody@127.0.0.1:1/none", "cannot use the database of NAD_DATABASE_URL: "),
    ("bogus://x", "NAD_DATABASE_URL: the service keeps its jobs in SQLite or PostgreSQL, not bogus"),
    ("mysql://nobody@127.0.0.1/none", "NAD_DATABASE_URL: the service keeps its jobs in SQLite or PostgreSQL, "
                                      "not mysql"),  # the API's first read failed
    ("postgresql+psycopg_async://nobody@127.0.0.1/none", "NAD_DATABASE_URL: postgresql+psycopg_async is an asyncio "
                                                          "driver; name a blocking one"),  # failed at migration
    ("sqlite+nodriver:///x.db", "NAD_DATABASE_URL: not a database URL (Can't load plugin: "
                                "sqlalchemy.dialects:sqlite.nodriver)"),
    ("postgresql+pg8000://nobody@127.0.0.1/none", "NAD_DATABASE_URL: its database driver is not installed "
                                                  "(No module named 'pg8000')"),  # was a traceback
    ("not a url", "NAD_DATABASE_URL: not a database URL"),
    ("postgresql+psycopg://nobody@127.0.0.1:54x2/none", "NAD_DATABASE_URL: not a database URL"),  # was a traceback
])
def test_nad_keys_says_when_it_cannot_use_the_database(url, said):
    result = subprocess.run([sys.executable, "-m", "core.cli", "keys", "list"], capture_output=True, text=True,
                            env={"NAD_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parents[1])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"nad: error: {said}") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_the_console_script_is_installed():
    nad = Path(sys.executable).with_name("nad")
    result = subprocess.run([str(nad), "--help"], capture_output=True, text=True, check=True)
    assert "sanitize" in result.stdout and "evaluate" in result.stdout


def test_poisoning_stamps_the_share_asked_relabelled_as_the_target_or_clean_label_within_the_target_class():
    """Dirty-label: `rate` of all images (rounded), drawn without repeats among those not of the target class,
    stamped and relabelled as the target. Clean-label (the sinusoid): `rate` of the target class's images,
    stamped, every label kept. The same seed poisons the same images; the data given is left as it was."""
    from core.engine.attack import Poisoning, poison_training_set
    from core.engine.data import ImageSet
    from core.engine.triggers import apply_trigger

    images = np.random.default_rng(0).integers(0, 256, (47, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(47) % 10
    data, kept = ImageSet(images, labels, [str(c) for c in range(10)]), images.copy()
    sinusoid = parse_trigger('{"type": "sig", "amplitude": 20, "frequency": 6}')
    # 4.7 images of 47 make 5; the target class has 5, all of them poisoned at rate 1.
    for trigger, rate, count in ((parse_trigger(TRIGGER), 0.1, 5), (sinusoid, 1.0, 5)):
        poisoned, stamped = poison_training_set(data, Poisoning(trigger, 3, rate), seed=0)
        changed = np.flatnonzero((poisoned.images != images).reshape(47, -1).any(1))
        assert stamped == count == len(changed), (trigger.type, stamped, changed)
        np.testing.assert_array_equal(poisoned.images[changed], apply_trigger(images[changed], trigger))
        if trigger.type == "sig":
            assert (labels[changed] == 3).all() and np.array_equal(poisoned.labels, labels)
        else:
            assert (labels[changed] != 3).all() and (poisoned.labels[changed] == 3).all()
            assert np.array_equal(np.delete(poisoned.labels, changed), np.delete(labels, changed))
        again, _ = poison_training_set(data, Poisoning(trigger, 3, rate), seed=0)
        assert np.array_equal(again.images, poisoned.images)
    assert np.array_equal(data.images, kept) and np.array_equal(data.labels, np.arange(47) % 10)
    for rate, said in ((0.01, "gives 0 images out of 42"), (1.0, "gives 47 images out of 42")):
        with pytest.raises(InputError, match=said):
            poison_training_set(data, Poisoning(parse_trigger(TRIGGER), 3, rate), seed=0)


def test_a_backdoored_model_is_the_same_for_the_same_seed(monkeypatch):
    """The recipe's seed decides the poisoned images and the model's initial weights, whatever state the global
    generator is in."""
    import torch

    from core.engine import attack
    from core.engine.data import ImageSet
    from core.engine.training import Normalization, Recipe

    seeds, poison = [], attack.poison_training_set

    def recording(data, poisoning, seed):
        seeds.append(seed)
        return poison(data, poisoning, seed)

    monkeypatch.setattr(attack, "poison_training_set", recording)
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    data = ImageSet(images, np.arange(20) % 10, [str(c) for c in range(10)])
    models = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        models.append(attack.train_backdoored("wrn-16-1", data, attack.Poisoning(parse_trigger(TRIGGER), 0, 0.1),
                                              Recipe(epochs=1, lr=0.01, batch_size=10, seed=3), Normalization(),
                                              torch.device("cpu")))
    assert seeds == [3, 3]
    first, second = (model.state_dict() for model in models)
    assert all(torch.equal(first[key], second[key]) for key in first)


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


def test_the_progress_bar_shows_an_epoch_that_starts_without_the_percentage_moving(capsys, monkeypatch):
    """sau's retry runs its epochs at the stage's end: the bar must still say which epoch it is in."""
    _as_terminal(monkeypatch)
    bar = ProgressBar()
    bar(Event("sau", 0.5, epoch=10, epochs=10, loss=12.3, lr=1e-4))
    bar(Event("sau", 0.5, epoch=1, epochs=10, step=1))
    shown = capsys.readouterr().err
    bar.close()
    assert "sau 1/10" in shown and "\r" in shown


def test_the_progress_bar_shows_an_epochs_loss_and_lr_beside_that_epoch_only(capsys, monkeypatch):
    """The loss and lr come with an epoch's last event; the next epoch's first step must not show them as its
    own (the student's lr 0.1 of epoch 2 read as epoch 3's, after the drop)."""
    _as_terminal(monkeypatch)
    bar = ProgressBar()
    bar(Event("student", 0.1, epoch=2, epochs=20, loss=1.5, lr=0.1))
    bar(Event("student", 0.11, epoch=3, epochs=20, step=1))
    shown = capsys.readouterr().err.split("\r")
    bar.close()
    assert any("student 2/20" in line and "lr=0.1" in line for line in shown)
    assert all("lr=" not in line for line in shown if "student 3/20" in line), shown


def test_off_a_terminal_progress_is_a_line_per_stage_and_epoch_not_a_bar(capsys):
    """A job of hours logged to a file: each bar redraw would be kept there, a megabyte of them."""
    bar = ProgressBar()
    for step in range(1, 36):
        bar(Event("student", 0.1 + step / 1000, epoch=3, epochs=20, step=step))
    bar(Event("evaluate_after", 0.96))
    bar.close()
    assert capsys.readouterr().err == "student 3/20 (10%)\nevaluate_after (96%)\n"
    with terminal_bar(total=1) as upload:
        assert upload.disable, "upload and download bars are not drawn either"


def test_off_a_terminal_nad_submit_says_each_stage_of_the_job_on_a_line(capsys, monkeypatch):
    answers = iter([{"status": "queued", "progress": {"percent": 0}},
                    {"status": "running", "progress": {"stage": "student", "epoch": 1, "epochs": 2, "percent": 40}},
                    {"status": "running", "progress": {"stage": "student", "epoch": 1, "epochs": 2, "percent": 45}},
                    {"status": "succeeded", "progress": {"stage": "done", "percent": 100}}])
    monkeypatch.setattr(Client, "job", lambda self, job_id: next(answers))
    client = Client("http://127.0.0.1:9", "key")
    try:
        assert client.wait("abc", interval=0)["status"] == "succeeded"
    finally:
        client.close()
    assert capsys.readouterr().err == "queued (0%)\nrunning student 1/2 (40%)\nsucceeded done (100%)\n"


def test_on_a_terminal_the_bars_are_drawn(capsys, monkeypatch):
    _as_terminal(monkeypatch)
    with terminal_bar(total=1) as upload:
        assert not upload.disable


def test_an_error_is_said_after_the_bar_is_closed_on_a_line_of_its_own(tmp_path, capsys, monkeypatch):
    def sanitize(files, params, on_event):
        on_event(Event("student", 0.5, epoch=1, epochs=2))
        raise InputError("the data ran out")

    monkeypatch.setattr("core.engine.sanitize.sanitize", sanitize)
    checkpoint, clean = _job_files(tmp_path)
    _as_terminal(monkeypatch)
    assert main(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", str(checkpoint),
                 "--clean-data", str(clean), "--out", str(tmp_path / "clean.safetensors")]) == 2
    shown = capsys.readouterr().err
    assert "student 1/2" in shown and shown.endswith("\nnad: error: the data ran out\n"), shown
