"""Attention maps and the AT loss, against hand computations; and proof the AT term trains the student."""

import math

import pytest
import torch

from core.engine.attention import EPS, attention_loss, attention_map, tap
from core.engine.defenses import distill, nad_objective
from core.engine.models import Distillation, build_model
from core.engine.training import Execution, Normalization, Recipe, Watch


def test_attention_map_matches_hand_computation():
    # one image, two channels, 1x2 spatial: |F|^2 summed over channels = [1+9, 4+16] = [10, 20]
    features = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])
    norm = math.sqrt(10**2 + 20**2)
    expected = torch.tensor([[[[10 / (norm + EPS), 20 / (norm + EPS)]]]])
    assert torch.allclose(attention_map(features), expected)


def test_attention_map_is_unit_norm_per_image():
    amap = attention_map(torch.randn(4, 8, 5, 5))
    assert amap.shape == (4, 1, 5, 5)
    assert torch.allclose(amap.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)


def test_attention_loss_is_beta_weighted_mse():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = 500 * ((attention_map(s) - attention_map(t)) ** 2).mean()
    assert torch.allclose(attention_loss([s], [t], [500.0]), expected)
    assert attention_loss([t], [t], [1000.0]).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_loss_tolerates_different_map_sizes():
    loss = attention_loss([torch.randn(2, 3, 8, 8)], [torch.randn(2, 6, 4, 4)], [1.0])
    assert torch.isfinite(loss)


def test_the_larger_map_is_average_pooled_to_the_smaller_before_normalising():
    """Maps of different sizes are compared after average pooling (max pooling would weigh a single hot pixel as
    a whole region). One image, one channel, 2x4: |F|^2 = [[1, 0, 4, 4], [0, 0, 0, 0]], pooled to 1x2 by
    averaging each 2x2 block: [0.25, 2.0], normalised [0.1240, 0.9923] (max pooling: [1, 4] -> [0.2425, 0.9701])."""
    features = torch.tensor([[[[1.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]]])
    norm = math.sqrt(0.25**2 + 2.0**2)
    expected = torch.tensor([[[[0.25 / (norm + EPS), 2.0 / (norm + EPS)]]]])
    assert torch.allclose(attention_map(features, size=(1, 2)), expected)
    assert torch.allclose(expected, torch.tensor([[[[0.1240, 0.9923]]]]), atol=1e-4)
    # A 1x2 teacher whose own map is the pooled one: the loss pools the student to the teacher's size.
    teacher = torch.tensor([[[[math.sqrt(0.25), math.sqrt(2.0)]]]])
    assert attention_loss([features], [teacher], [1000.0]).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_term_sends_gradient_to_the_student_only():
    student, teacher = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    attention_loss([student], [teacher], [1000.0]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_nad_objective_trains_the_student_through_the_attention_term():
    """With cross-entropy taken out of the total loss, the student's weights still receive gradient and the
    teacher's none: the AT term is live (the authors' public code once detached it, so it trained nothing). The
    total, not the `at_loss` part the history reports: a total with the term detached would train nothing by it."""
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 10), build_model("wrn-16-1", 10)
    distillation = Distillation(("block1", "block2", "block3"), (500.0, 1000.0, 1000.0))
    inputs, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with tap(student, distillation.layers) as s_feats, tap(teacher, distillation.layers) as t_feats:
        loss, parts, _ = nad_objective(student, teacher, distillation, s_feats, t_feats)(inputs, labels)
    assert parts["at_loss"].item() > 0
    assert set(parts) == {"ce_loss", "at_loss"} and torch.allclose(loss, parts["ce_loss"] + parts["at_loss"])
    (loss - parts["ce_loss"]).backward()
    conv = student.block1.layer[0].conv1.weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_leaves_the_teacher_exactly_as_it_was_and_in_evaluation_mode():
    """The teacher runs in evaluation mode: in training mode its BatchNorm layers would normalise with each
    batch's statistics and update their running ones (and batch counts) on every forward pass, even without
    gradient, so the teacher would drift while the student distils from it."""
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 10), build_model("wrn-16-1", 10)
    teacher.train()  # as a freshly fine-tuned teacher is left
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(8) % 10
    recipe = Recipe(epochs=1, lr=0.01, batch_size=4, augment=False)
    distill(student, teacher, Distillation(("block1", "block2", "block3"), (500.0, 1000.0, 1000.0)), images,
            labels, recipe, Normalization(), Watch("nad", lambda e: None, lambda: False), Execution())
    assert not teacher.training and not any(module.training for module in teacher.modules())
    after = teacher.state_dict()
    assert list(after) == list(before)
    assert any(key.endswith("num_batches_tracked") for key in before)
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_the_teacher_runs_once_a_batch_when_the_objective_is_asked_twice():
    """A sharpness-aware step evaluates the objective twice on one batch: the teacher's features are reused,
    and the second evaluation's attention term is the one a fresh teacher pass would give."""
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 10), build_model("wrn-16-1", 10)
    distillation = Distillation(("block1", "block2", "block3"), (500.0, 1000.0, 1000.0))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    inputs, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with tap(student, distillation.layers) as s_feats, tap(teacher, distillation.layers) as t_feats:
        objective = nad_objective(student, teacher, distillation, s_feats, t_feats)
        first = objective(inputs, labels)[1]["at_loss"]
        with torch.no_grad():
            student.block1.layer[0].conv1.weight.mul_(1.5)  # as a sharpness-aware step moves the student
        again = objective(inputs, labels)[1]["at_loss"]
        assert len(calls) == 1 and not torch.equal(first, again)
        fresh = nad_objective(student, teacher, distillation, s_feats, t_feats)(inputs, labels)[1]["at_loss"]
        assert len(calls) == 2 and torch.equal(again, fresh)
        objective(inputs.clone(), labels)
        assert len(calls) == 3, "a new batch runs the teacher again"


def test_tap_records_named_outputs_and_removes_its_hooks():
    model = build_model("wrn-16-1", 10)
    with tap(model, ["block1", "block3"]) as outputs:
        model(torch.rand(2, 3, 32, 32))
        assert [tuple(o.shape) for o in outputs] == [(2, 16, 32, 32), (2, 64, 8, 8)]
    assert not model.block1._forward_hooks
