"""`method: auto` on the digits backdoor: every candidate runs on its own copy, the choice is made on clean data
only and explained."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from conftest import DigitsCase
from core.engine.auto import (
    ESTIMATE_MARGIN,
    Cutoff,
    Ran,
    Spent,
    Split,
    against_suspect,
    close_misses,
    correct,
    decide,
    fits,
    pick,
    second_held,
    second_look,
)
from core.engine.checkpoints import write_checkpoint
from core.engine.data import stratified_split
from core.engine.errors import Cancelled, InputError
from core.engine.methods import Defended, Run, stages
from core.engine.metrics import percent
from core.engine.models import build_model
from core.engine.sanitize import Clock
from core.engine.training import Execution, Normalization
from core.params import SanitizeParams


def test_auto_runs_each_candidate_and_reports_its_choice(digits_backdoor, tmp_path):
    events = []
    # The default candidates, sau with the digits settings of test_sau.py.
    report = digits_backdoor.sanitize(tmp_path / "clean.safetensors", events.append, time_limit=3600,
                                      method="auto", auto_budget=3.0, sau_lr=5e-4, sau_batch_size=32, sau_bound=0.1)
    auto = report["auto"]
    assert [row["method"] for row in auto["candidates"]] == ["nad", "sau", "fst"] and auto["skipped"] == []
    assert auto["chosen"] in ("nad", "sau", "fst") and auto["chosen"] in auto["reason"]
    assert auto["selection_images"] + auto["trained_on"] == report["evaluation"]["n_train"]
    index, reason = pick(auto["candidates"], auto["suspect_selection_acc"], auto["budget"])
    assert auto["chosen"] == auto["candidates"][index]["method"] and auto["reason"] == reason
    # Each candidate is measured on the evaluation set too (the chosen one as the report's "after"), for the
    # user who knows the attack.
    chosen = auto["candidates"][index]["measured"]
    assert chosen == {key: report["after"][key] for key in ("acc", "acc_non_target", "asr", "asr_without_trigger")}
    assert all(row["measured"]["asr"] is not None for row in auto["candidates"])
    # Each row says on how many images its selection accuracy differs from the suspect's, which is the gap.
    for row in auto["candidates"]:
        gap = 100.0 * (row["selection_gained"] - row["selection_lost"]) / auto["selection_images"]
        assert abs(row["selection_acc"] - auto["suspect_selection_acc"] - gap) < 0.02
        assert row["selection_gap_se"] > 0 or row["selection_gained"] + row["selection_lost"] == 0
    assert {row["stage"] for row in report["history"]} == {"nad/teacher", "nad/student", "sau/sau", "fst/fst"}
    progress = [event.progress for event in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert report["after"]["asr"] < report["before"]["asr"]
    # sau ran as a candidate, so the report says the warp search it ran with: none, the sign quiet on a patch.
    assert not report["resampling"]["fired"] and report["resampling"]["sau_warp"] == 0.0


def test_auto_runs_only_the_candidates_the_jobs_time_allows(digits_backdoor, tmp_path):
    """A job near its time limit ends with a cleansed model instead of failing: the first candidate always
    runs, a later one whose estimated time does not fit is skipped, and the report says so."""
    # 1000 sau epochs cost 9000 epochs of fine-tuning: far past the 10 minutes, which finetune's 5 leave.
    report = digits_backdoor.sanitize(tmp_path / "clean.safetensors", time_limit=600, method="auto",
                                      auto_candidates=["finetune", "sau"], sau_epochs=1000)
    auto = report["auto"]
    assert [row["method"] for row in auto["candidates"]] == ["finetune"] and auto["chosen"] == "finetune"
    [skipped] = auto["skipped"]
    assert skipped["method"] == "sau" and skipped["estimated_seconds"] > skipped["seconds_left"] > 0
    assert {row["stage"] for row in report["history"]} == {"finetune/teacher"}


def test_a_candidate_that_runs_out_of_time_is_stopped_and_the_choice_made_among_those_that_finished(
        digits_backdoor, tmp_path, monkeypatch):
    """A later candidate that the estimate let start but that would run past the job's time is stopped
    between epochs, instead of the job's limit failing the job and losing the candidate that finished. Here
    the time left runs out before sau's third epoch."""
    asks = []
    ask = Cutoff.__call__

    def running_out(cutoff: Cutoff) -> bool:
        asks.append(cutoff)
        if len(asks) == 3:
            cutoff.deadline = time.monotonic()
        return ask(cutoff)

    monkeypatch.setattr(Cutoff, "__call__", running_out)
    report = digits_backdoor.sanitize(tmp_path / "clean.safetensors", time_limit=3600, method="auto",
                                      auto_candidates=["finetune", "sau"], sau_epochs=5, sau_batch_size=32)
    auto = report["auto"]
    assert [row["method"] for row in auto["candidates"]] == ["finetune"] and auto["chosen"] == "finetune"
    [stopped] = auto["skipped"]
    assert stopped["method"] == "sau" and stopped["estimated_seconds"] <= stopped["seconds_left"]
    assert stopped["stopped_after_seconds"] >= 0
    assert [row["epoch"] for row in report["history"] if row["stage"] == "sau/sau"] == [1, 2]


def test_the_users_cancel_during_a_later_candidate_still_cancels_the_job(digits_backdoor, tmp_path):
    """At once, from inside the candidate: the cutoff's catch does not take the user's cancel for its own."""
    events = []
    with pytest.raises(Cancelled, match="before sau/sau epoch 2"):
        digits_backdoor.sanitize(tmp_path / "clean.safetensors", events.append, time_limit=3600,
                                 should_stop=lambda: any(event.stage == "sau/sau" for event in events),
                                 method="auto", auto_candidates=["finetune", "sau"], sau_epochs=5,
                                 sau_batch_size=32)


def test_a_candidate_stops_before_an_epoch_that_would_end_past_the_deadline(monkeypatch):
    """The next epoch is expected to take as long as the longest so far, with the estimate's margin."""
    now = [0.0]
    monkeypatch.setattr("core.engine.auto.time.monotonic", lambda: now[0])
    cutoff = Cutoff(deadline=100.0, last=0.0)
    asked = []
    edge = 100.0 - ESTIMATE_MARGIN * 30.0  # the last ask at which a 30 s epoch, with the margin, ends in time
    for now[0] in (0.0, 30.0, 50.0, edge - 1.0, edge + 1.0):
        asked.append(cutoff())
    assert asked == [False, False, False, False, True] and cutoff.reached


def test_a_candidates_time_is_estimated_from_the_ones_before_it_by_their_cost():
    spent = Spent()
    spent.add(cost=10, seconds=20.0)  # nad's teacher and student, say: 2 s an epoch
    spent.add(cost=30, seconds=40.0)
    assert spent.estimate(90) == pytest.approx(ESTIMATE_MARGIN * 90 * 1.5)


def test_a_candidate_that_warns_is_set_aside_and_a_kept_ones_warning_reaches_the_report(digits_backdoor, tmp_path,
                                                                                        monkeypatch):
    """The path from a method's warning to the job's report, with sau made to warn on any run (the digits model
    does not saturate it): alone, its warning is the report's; in auto, finetune is kept over it and the
    reason says why."""
    monkeypatch.setattr("core.engine.sau.SATURATED", -1.0)
    alone = digits_backdoor.sanitize(tmp_path / "sau.safetensors", method="sau", sau_epochs=1, sau_batch_size=32)
    assert len(alone["warnings"]) == 1 and "backdoor may be intact" in alone["warnings"][0]
    report = digits_backdoor.sanitize(tmp_path / "auto.safetensors", method="auto", auto_candidates=["sau", "finetune"],
                                      auto_budget=100.0, sau_epochs=1, sau_batch_size=32)
    auto = report["auto"]
    assert auto["chosen"] == "finetune" and "sau set aside: sau's shared loss was above" in auto["reason"]
    assert "warning" in auto["candidates"][0] and "warning" not in auto["candidates"][1]
    assert report["warnings"] == []


@pytest.fixture
def squeezenet_suspect(digits_backdoor, tmp_path) -> DigitsCase:
    """The digits case with an untrained SqueezeNet as the suspect: its logits come from a convolution, so it has
    no linear classifier layer for fst (and no BatchNorm for anp). It needs 32 x 32 inputs."""
    checkpoint = tmp_path / "squeezenet.safetensors"
    write_checkpoint(build_model("squeezenet1_1", 10), checkpoint, {"arch": "squeezenet1_1"})
    return dataclasses.replace(digits_backdoor, checkpoint=checkpoint,
                               params={**digits_backdoor.params, "arch": "squeezenet1_1", "input_size": 32})


def test_a_candidate_that_cannot_clean_the_model_is_left_out_and_said(squeezenet_suspect, tmp_path):
    """Not a failed job after the other candidates trained: fst and anp are skipped with their reasons, before
    anything trains."""
    report = squeezenet_suspect.sanitize(tmp_path / "auto.safetensors", method="auto",
                                         auto_candidates=["fst", "finetune", "anp"], teacher_epochs=1)
    auto = report["auto"]
    assert [row["method"] for row in auto["candidates"]] == ["finetune"] and auto["chosen"] == "finetune"
    fst, anp = auto["skipped"]
    assert fst["method"] == "fst" and "linear classifier layer" in fst["reason"]
    assert anp["method"] == "anp" and "no BatchNorm layer" in anp["reason"]
    assert {row["stage"] for row in report["history"]} == {"finetune/teacher"}
    assert report["teacher"] == "fine-tuned 1 epochs"  # finetune's, a candidate


def test_anp_as_a_candidate_prunes_its_own_copy_and_leaves_the_suspect_whole_for_the_next(digits_backdoor, tmp_path):
    """anp's masks go on the candidate's own BatchNorm layers. On the suspect's, which the copy does not use,
    the masks had no gradient and the job failed; and a pruned suspect would be where every later candidate
    starts. At threshold 1 anp prunes every neuron of its copy; finetune after it still starts from the suspect."""
    report = digits_backdoor.sanitize(tmp_path / "auto.safetensors", time_limit=3600, method="auto",
                                      auto_candidates=["anp", "finetune"], anp_iterations=8, anp_threshold=1.0,
                                      auto_budget=3.0)
    auto = report["auto"]
    anp, finetune = auto["candidates"]
    assert (anp["method"], finetune["method"], auto["chosen"]) == ("anp", "finetune", "finetune")
    assert anp["selection_acc"] < auto["suspect_selection_acc"] - 50  # nothing left of its copy
    # from the suspect, whole: 2 to 4 points under it, by the machine (its 50 selection images are 2 points
    # each); from the suspect with every neuron pruned it reads 12.0, chance
    assert finetune["selection_acc"] >= auto["suspect_selection_acc"] - 10.0
    # The job's "after" is the kept candidate's measure, not the first's; both trained without the selection set.
    assert finetune["measured"] == {key: report["after"][key] for key in finetune["measured"]}
    assert anp["measured"]["acc"] < finetune["measured"]["acc"]
    assert auto["selection_images"] + auto["trained_on"] == report["evaluation"]["n_train"]


def test_a_candidates_cost_counts_its_stages_by_their_weight_and_a_supplied_teacher_as_nothing():
    """What auto estimates a candidate's time from and the progress bar is shared by: a SAU epoch counts 9 epochs
    of fine-tuning, an I-BAU round 20, ANP 10; nad and finetune train no teacher when one is supplied."""
    params = SanitizeParams(arch="wrn-16-1", num_classes=10, sau_epochs=3, ibau_rounds=2, teacher_epochs=4,
                            nad_sam_rho=0.0)
    assert stages("sau", params, trains_teacher=True) == {"sau": 27}
    assert stages("ibau", params, trains_teacher=True) == {"ibau": 40}
    assert stages("anp", params, trains_teacher=True) == {"anp": 10}
    assert stages("finetune", params, trains_teacher=True) == {"teacher": 4}
    assert stages("finetune", params, trains_teacher=False) == {}
    assert stages("nad", params, trains_teacher=False) == {"student": 20}


def test_auto_is_the_default_method_with_nad_then_sau_then_fst_within_2_points():
    """The defaults docs/engine.md ("Choosing automatically") promises; an empty candidate list is refused, since
    auto would have nothing to keep."""
    params = SanitizeParams(arch="wrn-16-1", num_classes=10)
    assert (params.method, params.auto_candidates, params.auto_budget) == ("auto", ["nad", "sau", "fst"], 2.0)
    with pytest.raises(ValidationError, match="auto_candidates"):
        SanitizeParams(arch="wrn-16-1", num_classes=10, auto_candidates=[])


@pytest.mark.parametrize(("method", "candidates", "words"), [
    ("fst", ["nad"], "linear classifier layer"),
    ("auto", ["fst"], "linear classifier layer"),
])
def test_a_method_that_cannot_clean_the_model_fails_the_job_before_it_trains(squeezenet_suspect, tmp_path, method,
                                                                            candidates, words):
    events = []
    with pytest.raises(InputError, match=words):
        squeezenet_suspect.sanitize(tmp_path / "out.safetensors", events.append, method=method,
                                    auto_candidates=candidates)
    assert {event.stage for event in events} <= {"load"}


def test_clean_data_with_one_image_a_class_is_refused_before_anything_trains(digits_backdoor, tmp_path):
    """Nothing can be set aside for the choice; the selection accuracy would divide by zero."""
    clean = np.load(digits_backdoor.clean)
    first = [int(np.flatnonzero(clean["y"] == label)[0]) for label in range(10)]
    np.savez(tmp_path / "one-each.npz", x=clean["x"][first], y=clean["y"][first])
    events = []
    with pytest.raises(InputError, match="single image"):
        dataclasses.replace(digits_backdoor, clean=tmp_path / "one-each.npz").sanitize(
            tmp_path / "clean.safetensors", events.append, method="auto", auto_candidates=["finetune"])
    assert not any(event.stage.startswith("finetune") for event in events)


def test_with_nothing_trained_yet_there_is_no_rate_and_the_candidate_runs():
    spent = Spent()
    spent.add(cost=0, seconds=4.0)  # finetune with a supplied teacher: measured, never trained
    assert spent.estimate(90) == 0.0


def test_the_gap_to_the_suspect_is_counted_image_by_image_with_its_standard_error():
    """The NAD authors' model at seed 6: the suspect right and nad wrong on 24 of 250 images, the other way on
    15; nad 3.6 points under, give or take 2.5."""
    suspect_right = np.ones(250, dtype=bool)
    suspect_right[:51] = False  # the suspect right on 199 (any share will do: the counts make the error)
    right = suspect_right.copy()
    right[51:75] = False  # lost 24
    right[:15] = True  # gained 15
    compared = against_suspect(right, suspect_right)
    assert compared == {"selection_acc": 76.0, "selection_lost": 24, "selection_gained": 15,
                        "selection_gap_se": 2.49}
    assert against_suspect(suspect_right, suspect_right)["selection_gap_se"] == 0.0


ROWS = [{"method": "nad", "selection_acc": 70.0},
        {"method": "sau", "selection_acc": 89.0},
        {"method": "finetune", "selection_acc": 90.0}]


def test_pick_keeps_the_first_candidate_within_the_budget():
    """The order is the preference: sau before finetune, which is one point more accurate, and nad, the first,
    is too costly."""
    index, reason = pick(ROWS, suspect_acc=91.0, budget=2.0)
    assert ROWS[index]["method"] == "sau" and reason.startswith("sau is the first candidate")
    index, _ = pick(ROWS, suspect_acc=91.0, budget=25.0)
    assert ROWS[index]["method"] == "nad"


def test_pick_keeps_the_most_accurate_when_none_is_within_the_budget_and_says_so():
    """Our patch model, retrained on 2026-12-05: the suspect memorised its training images and reads 90.8 on
    them; nad, 1.2 points under sau, was kept when the budget was measured from the most accurate, at 80.06 %
    on the test set where sau kept 82.00 (84.13 before)."""
    rows = [{"method": "nad", "selection_acc": 83.6}, {"method": "sau", "selection_acc": 84.8},
            {"method": "fst", "selection_acc": 71.6}]
    index, reason = pick(rows, suspect_acc=90.8, budget=2.0)
    assert rows[index]["method"] == "sau" and reason.startswith("no candidate kept clean accuracy")
    assert reason.endswith("sau is the most accurate (84.80 %)")
    tied = [dict(row, selection_acc=84.8) for row in rows]
    index, _ = pick(tied, suspect_acc=90.8, budget=2.0)
    assert tied[index]["method"] == "nad"  # on a tie, the order


def test_pick_sets_aside_a_candidate_whose_own_signals_say_the_backdoor_survived():
    """Our blend model: sau's shared loss ended saturated and it was the one within the budget; nad is kept,
    and the reason says why sau was not. When every candidate has a warning, the usual rule applies."""
    rows = [{"method": "nad", "selection_acc": 80.8}, {"method": "sau", "selection_acc": 88.8, "warning": "saturated"}]
    index, reason = pick(rows, suspect_acc=90.0, budget=2.0)
    assert rows[index]["method"] == "nad" and reason.endswith("; sau set aside: saturated")
    assert "most accurate (80.80 %)" in reason
    both = [dict(row, warning="saturated") for row in rows]
    index, reason = pick(both, suspect_acc=90.0, budget=2.0)
    assert both[index]["method"] == "sau" and "set aside" not in reason


SEED_6 = [{"method": "nad", "selection_acc": 84.4, "selection_gap_se": 2.49},
          {"method": "sau", "selection_acc": 88.4, "selection_gap_se": 1.1},
          {"method": "fst", "selection_acc": 45.6, "selection_gap_se": 3.4}]


def test_a_candidate_before_the_kept_one_that_missed_the_budget_by_no_more_than_its_error_gets_a_second_look():
    """The NAD authors' model at seed 6: nad read 3.6 points under the suspect's 88.0, out of the budget by 1.6,
    no more than its gap's standard error (2.49); sau, after it, was kept. Our GPU-trained warp at seed 2 (SE not
    recorded; 2.5 taken): nad 4.0 under, sau kept by the fallback. Out by more than the error, after the kept
    one, or set aside by a warning: no second look."""
    assert close_misses(SEED_6, kept=1, suspect_acc=88.0, budget=2.0) == [0]
    warp = [{"method": "nad", "selection_acc": 84.4, "selection_gap_se": 2.5},
            {"method": "sau", "selection_acc": 86.0, "selection_gap_se": 1.8}]
    assert close_misses(warp, kept=1, suspect_acc=88.4, budget=2.0) == [0]
    assert close_misses(SEED_6, kept=1, suspect_acc=89.0, budget=2.0) == []  # 4.6 under: out by 2.6
    assert close_misses(SEED_6, kept=0, suspect_acc=88.0, budget=2.0) == []
    warned = [dict(SEED_6[0], warning="saturated"), *SEED_6[1:]]
    assert close_misses(warned, kept=1, suspect_acc=88.0, budget=2.0) == []
    edge = [{"method": "nad", "selection_acc": 84.0, "selection_gap_se": 2.0}, SEED_6[1]]
    assert close_misses(edge, kept=1, suspect_acc=88.0, budget=2.0) == [0]  # out by exactly the error


def test_a_close_miss_after_the_kept_candidate_gets_no_second_look_and_cannot_displace_it():
    """The order is the preference: a candidate after the kept one would not be kept over it even within the
    budget, so a close miss there is not trained again (that would cost a run for nothing), and a second look
    that came back within the budget must not put it before the first. Here nad is 2 points over the suspect,
    within the budget and kept; sau, after it, is out by 1.0, no more than its error (1.5)."""
    rows = [{"method": "nad", "selection_acc": 90.0, "selection_gap_se": 1.2},
            {"method": "sau", "selection_acc": 85.0, "selection_gap_se": 1.5}]
    assert pick(rows, suspect_acc=88.0, budget=2.0)[0] == 0
    assert close_misses(rows, kept=0, suspect_acc=88.0, budget=2.0) == []
    looked = []
    index, reason = decide(rows, suspect_acc=88.0, budget=2.0, look=lambda i: looked.append(i) or _look(True))
    assert looked == [] and index == 0 and reason.startswith("nad is the first candidate")
    assert all("second_look" not in row for row in rows)


def test_the_budgets_edge_is_within_it_whatever_the_float_error():
    """Measured in float32, 97 of 100 read 97.0000029 points, which put a candidate at 95.0 (to the hundredth,
    as rows give it) out of a 2-point budget: accuracies are compared as the report gives them."""
    suspect = percent(np.arange(100) < 97)
    assert suspect == 97.0 and fits(95.0, suspect, 2.0) and not fits(94.99, suspect, 2.0)
    assert fits(0.3, 0.1 + 0.2, 0.0)  # 0.30000000000000004


def _look(within: bool) -> dict:
    """A second look at nad on the authors' model at seed 6: 250 more images, on which the suspect reads 84.0;
    nad either 84.4 there (2 under it on the 500, within) or 80.4 (4 under on the 500, out)."""
    there = 84.4 if within else 80.4
    return {"selection_images": 250, "suspect_selection_acc": 84.0, "selection_acc": there,
            "both": {"selection_images": 500, "suspect_selection_acc": 86.0, "selection_acc": 84.0 if within else 82.0},
            "within_budget": within}


@pytest.mark.parametrize("within", [True, False])
def test_a_second_look_within_the_budget_keeps_the_candidate_and_one_out_of_it_keeps_the_choice(within):
    rows = [dict(row) for row in SEED_6]
    looked = []
    index, reason = decide(rows, suspect_acc=88.0, budget=2.0, look=lambda i: looked.append(i) or _look(within))
    assert looked == [0] and rows[0]["second_look"]["within_budget"] is within
    assert "nad read 3.60 points under the suspect's 88.00 % on the selection set, out of the 2.0-point budget by " \
           "no more than that gap's standard error (2.49); trained again with another 250 images set aside, it read " \
           f"{'0.40 over' if within else '3.60 under'} there, {2.0 if within else 4.0:.2f} under on all 500" in reason
    if within:
        assert index == 0 and reason.startswith("nad is kept on a second look")
        assert reason.endswith("without it: sau is the first candidate that kept clean accuracy on the selection "
                               "set within 2.0 points of the suspect's 88.00 %")
    else:
        assert index == 1 and reason.startswith("sau is the first candidate")
        assert reason.endswith("4.00 under on all 500: still out of the budget")


def test_a_second_look_the_jobs_time_has_no_room_for_keeps_the_choice_and_says_so():
    rows = [dict(row) for row in SEED_6]
    index, reason = decide(rows, suspect_acc=88.0, budget=2.0,
                           look=lambda i: {"estimated_seconds": 300, "seconds_left": 100})
    assert index == 1 and reason.endswith("(2.49), and a second look at it did not fit in the job's time")


def test_the_second_selection_set_is_as_large_per_class_and_apart_from_the_first():
    labels = np.repeat(np.arange(10), 250)
    _, held = stratified_split(labels, 0.1, seed=6)
    second = second_held(labels, held, seed=6)
    assert not set(second) & set(held)
    assert np.array_equal(np.bincount(labels[second]), np.bincount(labels[held]))
    assert np.array_equal(second, second_held(labels, held, seed=6))


@pytest.mark.parametrize(("per_class", "drawn"), [(2, 0), (3, 10), (4, 10)])
def test_with_two_or_three_images_a_class_a_second_set_is_drawn_if_it_can_be_and_never_fails(per_class, drawn):
    """Two images a class leave one outside the first set: nothing to draw (the split would have been asked for
    all of them, which it refuses). The second look then says why it did not run."""
    labels = np.repeat(np.arange(10), per_class)
    _, held = stratified_split(labels, 0.1, seed=0)
    second = second_held(labels, held, seed=0)
    assert len(second) == drawn and not set(second) & set(held)


def test_a_second_look_with_no_images_to_set_aside_keeps_the_choice_and_says_why():
    rows = [dict(row) for row in SEED_6]
    index, reason = decide(rows, suspect_acc=88.0, budget=2.0, look=lambda i: {"reason": "none can be set aside"})
    assert index == 1 and reason.endswith("(2.49), and it got no second look: none can be set aside")


def test_a_second_look_trains_on_every_clean_image_but_its_own_selection_set_and_is_measured_on_that(monkeypatch):
    """Its selection set must not leak into its training, as the first one must not into the candidates': the
    second look trains on all the others (the first selection set among them) and is measured on it alone."""
    labels = torch.arange(200) % 10
    images = torch.zeros(200, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(200)  # each image says which it is
    trained_on = []

    def defend(method, model, fit_images, fit_labels, run):
        trained_on.append(set(fit_images[:, 0, 0, 0].tolist()))
        return Defended(model)

    monkeypatch.setattr("core.engine.auto.defend", defend)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    params = SanitizeParams(arch="wrn-16-1", num_classes=10, auto_candidates=["fst"], seed=3)
    run = Run(params, None, None, None, Normalization(), Execution(), None, Clock())
    _, held = stratified_split(labels.numpy(), 0.1, seed=3)
    first = Split.of(model, images, labels, held, run)
    right = correct(model, first.images, first.labels, run)
    ran = Ran({"method": "fst"} | against_suspect(right, first.suspect_right), Defended(model), {}, right)
    look = second_look(model, images, labels, held, ran, first, run, Spent())
    aside = set(second_held(labels.numpy(), held, seed=3).tolist())
    assert trained_on == [set(range(200)) - aside] and look["selection_images"] == len(aside) == 20
    assert look["both"]["selection_images"] == 40


def test_a_close_miss_is_trained_again_and_measured_on_both_sets(digits_backdoor, tmp_path):
    """End to end on the digits: fst (4 epochs) reads a few points under the suspect, finetune (with an lr that
    leaves the model as it is) less; a budget between fst's gap and that gap less its error gives fst a second
    look, whose stages train and report like a candidate's and whose progress waits where training ends."""
    case = dict(time_limit=3600, method="auto", auto_candidates=["fst", "finetune"], fst_epochs=4, teacher_lr=1e-6,
                teacher_epochs=1)
    plain = digits_backdoor.sanitize(tmp_path / "plain.safetensors", auto_budget=100.0, **case)["auto"]
    fst, finetune = plain["candidates"]
    gap = plain["suspect_selection_acc"] - fst["selection_acc"]
    assert gap > 0 and finetune["selection_acc"] > fst["selection_acc"], "the case needs fst under finetune"
    budget = round(gap - fst["selection_gap_se"] / 2, 2)
    events = []
    report = digits_backdoor.sanitize(tmp_path / "looked.safetensors", events.append, auto_budget=budget, **case)
    auto = report["auto"]
    look = auto["candidates"][0]["second_look"]
    assert look["selection_images"] == auto["selection_images"] and look["both"]["selection_images"] == 2 * look[
        "selection_images"]
    both = look["both"]
    assert both["selection_lost"] == fst["selection_lost"] + look["selection_lost"]
    assert look["within_budget"] == fits(both["selection_acc"], both["suspect_selection_acc"], budget)
    assert auto["chosen"] == ("fst" if look["within_budget"] else "finetune")
    assert "second_look" not in auto["candidates"][1]
    assert {row["stage"] for row in report["history"]} == {"fst/fst", "fst/second_look/fst", "finetune/teacher"}
    assert "fst/second_look/fst" in report["timings"]
    progress = [event.progress for event in events]
    assert progress == sorted(progress)
    assert {event.progress for event in events if event.stage == "fst/second_look/fst"} == {max(
        event.progress for event in events if event.stage == "finetune/teacher")}
