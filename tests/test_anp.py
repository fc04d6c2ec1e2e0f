"""Adversarial Neuron Pruning: it removes the digits backdoor end to end, and its mechanics hold on small random
models: the perturbation leaves nothing behind, masks stay in [0, 1], cancellation and seeds behave."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from conftest import noise_images, optimizers_made, read_metadata, watch_of
from core.engine.anp import (
    ROUND,
    AnpRecipe,
    adversarial_neuron_pruning,
    batch_norms,
    draw_batch,
    mask_step,
    optimize_masks,
    perturbable,
    prune,
)
from core.engine.checkpoints import write_checkpoint
from core.engine.errors import Cancelled, InputError
from core.engine.methods import unsuitable
from core.engine.models import build_model
from core.engine.sanitize import JobFiles, load_model, sanitize
from core.engine.training import Execution, Normalization, augment, draw_augmentation
from core.params import SanitizeParams

CPU = torch.device("cpu")
# Far shorter than the authors' 2000 iterations of 128 images, for a test: 70 of 64. How much of the digits
# backdoor ANP removes depends on the machine: the fixture's model is trained there, and other processors' kernels
# round differently. On the machine that first ran this, eps 0.3 and threshold 0.3 brought ASR under 2 % for seeds
# 0 to 5; on an AMD EPYC machine the same settings left 58 to 81 %, and threshold 0.5 left 14 to 30 % (seeds 0 to
# 3, ACC within 1 point); on an Intel Xeon machine threshold 0.5 pruned 13 to 17 neurons, took ASR to 0.2 % or
# less and cost 7.7 to 11.3 points of ACC (seeds 0 to 2; threshold 0.2: 2.2 to 4.6 points). So the test asks for
# what held on all three: ASR at least halved, ACC within 12 points, few neurons pruned (docs/engine.md).
DIGITS_ANP = {"method": "anp", "anp_iterations": 70, "anp_batch_size": 64, "anp_eps": 0.3, "anp_threshold": 0.5}


def _recipe(**changes) -> AnpRecipe:
    defaults = {"eps": 0.4, "steps": 1, "alpha": 0.2, "iterations": 4, "lr": 0.2, "batch_size": 8, "threshold": 0.2}
    return AnpRecipe(**(defaults | changes))


def _model(arch: str = "wrn-16-1") -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 10)


def test_anp_removes_the_digits_backdoor_and_keeps_accuracy(digits_backdoor, tmp_path):
    events = []
    report = digits_backdoor.sanitize(tmp_path / "clean.safetensors", events.append, **DIGITS_ANP)
    before, after = report["before"], report["after"]
    assert before["asr"] > 90, "the fixture's model should carry the backdoor"
    assert after["asr"] < before["asr"] / 2
    assert after["acc"] > before["acc"] - 12
    pruning = report["pruning"]
    assert pruning["neurons"] == 464 and 0 < pruning["pruned"] < 464 * 0.1
    assert pruning["pruned"] == sum(layer["pruned"] for layer in pruning["layers"].values())
    assert report["teacher"] is None and report["layers"] == []
    assert set(report["timings"]) >= {"load", "evaluate_before", "anp", "evaluate_after", "total"}
    assert "teacher" not in report["timings"]
    assert [(row["stage"], row["step"]) for row in report["history"]] == [("anp", 50), ("anp", 70)]
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {e.stage for e in events} == {"load", "evaluate_before", "anp", "evaluate_after", "done"}
    assert read_metadata(tmp_path / "clean.safetensors")["method"] == "anp"
    pruned = load_model(SanitizeParams(arch="wrn-16-1", num_classes=10), tmp_path / "clean.safetensors")
    zeros = sum(int((layer.weight == 0).sum()) for layer in batch_norms(pruned).values())
    assert zeros == pruning["pruned"]
    json.dumps(report)


@pytest.mark.parametrize("arch", ["wrn-16-1", "preact-resnet18", "resnet18"])
def test_the_perturbation_leaves_the_model_as_it_was_but_for_pruned_weights(arch):
    model = _model(arch)
    original = copy.deepcopy(model.state_dict())
    images, labels = noise_images(8)
    layers = batch_norms(model)
    # threshold 1 prunes every neuron: each BatchNorm weight zero, everything else as it was.
    report = adversarial_neuron_pruning(model, images, labels, _recipe(iterations=2, batch_size=4, threshold=1.0),
                                        Normalization(), watch_of("anp"), Execution())
    state = model.state_dict()
    assert list(state) == list(original)
    assert all(type(module) in (nn.BatchNorm2d, nn.BatchNorm1d) for module in layers.values())
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    pruned = {f"{name}.weight" for name in layers}
    assert all(not state[key].any() for key in pruned)
    assert all(torch.equal(state[key], original[key]) for key in original if key not in pruned)
    assert report["pruned"] == report["neurons"] == sum(layer.num_features for layer in layers.values())


def test_pruning_zeroes_the_weight_of_each_pruned_neuron_and_keeps_its_bias():
    """As the authors' `prune_neuron_cifar.py`: a pruned neuron emits a constant, its bias, rather than nothing.
    A fresh model's biases are all zero, so they are made non-zero here first; masks at or below the threshold
    (the authors' `<=`) prune, the others keep their neuron as it was."""
    model = _model()
    layers = batch_norms(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.uniform_(0.5, 1.5, generator=generator)
            layer.bias.uniform_(-1.0, 1.0, generator=generator)
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    biases = {name: layer.bias.detach().clone() for name, layer in layers.items()}
    assert all(bias.all() for bias in biases.values())
    masks = [torch.tensor([0.1, 0.2, 0.7, 1.0]).repeat(layer.num_features)[:layer.num_features]
             for layer in layers.values()]
    report = prune(layers, masks, threshold=0.2)
    assert report["pruned"] == sum(int((mask <= 0.2).sum()) for mask in masks) > 0
    for (name, layer), mask in zip(layers.items(), masks, strict=True):
        pruned = mask <= 0.2
        assert not layer.weight[pruned].any()
        assert torch.equal(layer.weight[~pruned], weights[name][~pruned])
        assert torch.equal(layer.bias, biases[name])


def test_inside_the_block_the_layers_are_perturbed_and_only_the_mask_learns():
    model = _model()
    layers = batch_norms(model)
    with perturbable(model, layers) as state:
        assert all(parametrize.is_parametrized(layer, "weight") for layer in layers.values())
        assert not any(p.requires_grad for p in model.parameters())
        assert not any(layer.track_running_stats for layer in layers.values())
        assert state.mask.requires_grad and len(state.mask) == sum(layer.num_features for layer in layers.values())
    assert all(layer.track_running_stats for layer in layers.values())


def test_a_normalisation_layer_anp_does_not_prune_keeps_its_running_statistics():
    """A BatchNorm without weight and bias has no neurons for ANP, but runs in training mode with the others:
    its running statistics must not drift over ANP's noisy batches into the returned model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    model.eval()
    original = copy.deepcopy(model.state_dict())
    images, labels = noise_images(8)
    adversarial_neuron_pruning(model, images, labels, _recipe(iterations=2, batch_size=4, threshold=0.0),
                               Normalization(), watch_of("anp"), Execution())
    untouched = model[4]
    assert list(batch_norms(model)) == ["1"] and untouched.track_running_stats and not model.training
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(untouched, name), original[f"4.{name}"]), name


def test_a_model_without_batchnorm_is_refused(tmp_path):
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert "no BatchNorm" in unsuitable("anp", plain)
    assert "no BatchNorm" in unsuitable("anp", nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False)))
    assert unsuitable("anp", _model()) is None
    # Through a job: refused while loading, before any evaluation or training.
    checkpoint = tmp_path / "squeezenet.safetensors"
    write_checkpoint(build_model("squeezenet1_1", 10), checkpoint, {"arch": "squeezenet1_1"})
    np.savez(tmp_path / "clean.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.arange(10))
    events = []  # 32 pixels a side: at 16 SqueezeNet's pooling leaves nothing (models.check_runs refuses it)
    params = SanitizeParams(arch="squeezenet1_1", num_classes=10, input_size=32, method="anp")
    with pytest.raises(InputError, match="no BatchNorm"):
        sanitize(JobFiles(checkpoint=checkpoint, clean_data=tmp_path / "clean.npz", out=tmp_path / "o.safetensors"),
                 params, on_event=events.append)
    assert [e.stage for e in events] == ["load"]


def test_masks_only_ever_take_values_in_0_to_1():
    """With a learning rate this large every step would throw masks far out of [0, 1]; after each step they are
    inside, and both bounds are reached."""
    model = _model()
    images, labels = noise_images(32)
    recipe = _recipe(lr=50.0)
    generator = torch.Generator().manual_seed(0)
    with perturbable(model, batch_norms(model)) as state:
        optimizer = torch.optim.SGD([state.mask], lr=recipe.lr, momentum=0.9)
        for _ in range(5):
            inputs, target = draw_batch(images, labels, recipe, generator, Normalization(), Execution())
            mask_step(model, state, optimizer, inputs, target, recipe, generator, Execution())
            assert state.mask.min() >= 0 and state.mask.max() <= 1
        assert (state.mask == 0).any() and (state.mask == 1).any()


def test_a_mask_step_is_the_authors_under_noise_drawn_then_moved_up_the_loss():
    """One iteration written out by hand on a model small enough for it: under perturbation the BatchNorm takes
    weight * (m + delta) and bias * (1 + xi), without it weight * m and bias, normalising with the batch's
    statistics (training mode); the noise starts uniform in [-eps, eps] and takes `steps` steps of eps / steps
    along the sign of the gradient, up the loss; the mask takes an SGD step on alpha * natural + (1 - alpha) *
    perturbed and is clipped to [0, 1] (docs/engine.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    bn = model[1]
    with torch.no_grad():  # a fresh layer's bias is zero and its running statistics those of no data
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.fill_(5.0)
    images, labels = noise_images(16, size=4)
    inputs = images.float() / 255
    recipe = _recipe(steps=2, batch_size=16)
    with perturbable(model, batch_norms(model)) as state:
        optimizer = torch.optim.SGD([state.mask], lr=recipe.lr, momentum=0.9)
        parts = mask_step(model, state, optimizer, inputs, labels, recipe, torch.Generator().manual_seed(0),
                          Execution())
        mask = state.mask.detach().clone()

    weight, bias = bn.weight.detach(), bn.bias.detach()

    def loss_with(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        features = F.batch_norm(model[0](inputs), None, None, weight * scale, bias * shift, training=True,
                                eps=bn.eps)
        return F.cross_entropy(model[5](model[4](model[3](model[2](features)))), labels)

    noise = recipe.eps * (torch.rand(2, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    for _ in range(recipe.steps):
        noise.requires_grad_()
        (gradient,) = torch.autograd.grad(loss_with(1 + noise[0], 1 + noise[1]), noise)
        noise = (noise + recipe.eps / recipe.steps * gradient.sign()).detach()
    m = torch.ones(4, requires_grad=True)
    perturbed, natural = loss_with(m + noise[0], 1 + noise[1]), loss_with(m, torch.ones(4))
    loss = recipe.alpha * natural + (1 - recipe.alpha) * perturbed
    (gradient,) = torch.autograd.grad(loss, m)
    torch.testing.assert_close(parts["nat_loss"], natural.detach())
    torch.testing.assert_close(parts["rob_loss"], perturbed.detach())
    torch.testing.assert_close(parts["loss"], loss.detach())
    torch.testing.assert_close(mask, (1 - recipe.lr * gradient).clamp(0, 1))
    assert (mask < 1).any() and not torch.equal(perturbed, natural)


def test_batches_are_drawn_with_replacement_and_cropped_and_flipped_when_augmenting():
    images, labels = noise_images(8)
    for augmenting in (True, False):
        recipe = _recipe(batch_size=16, augment=augmenting)
        inputs, target = draw_batch(images, labels, recipe, torch.Generator().manual_seed(0), Normalization(),
                                    Execution())
        generator = torch.Generator().manual_seed(0)
        index = torch.randint(8, (16,), generator=generator)
        expected = augment(images[index], *draw_augmentation(16, generator)) if augmenting else images[index]
        assert torch.equal(inputs, Normalization()(expected)) and torch.equal(target, labels[index])
        if augmenting:
            assert not torch.equal(inputs, Normalization()(images[index])), "some images cropped or flipped"


def test_the_masks_sgd_is_the_authors(monkeypatch):
    """lr `anp_lr`, momentum 0.9, no weight decay, on the masks only (docs/engine.md)."""
    made = optimizers_made(monkeypatch, "SGD")
    model = _model()
    images, labels = noise_images(8)
    optimize_masks(model, batch_norms(model), images, labels, _recipe(iterations=1, lr=0.3), Normalization(),
                   watch_of("anp"), Execution())
    ((group,),) = [optimizer.param_groups for optimizer in made]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.3, 0.9, 0, False)
    assert len(group["params"]) == 1 and len(group["params"][0]) == 464


def test_cancel_stops_between_rounds_and_leaves_the_model_untouched():
    model = _model()
    original = copy.deepcopy(model.state_dict())
    images, labels = noise_images(32)
    events, checks = [], []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > 1

    with pytest.raises(Cancelled, match=f"iteration {ROUND + 1}"):
        optimize_masks(model, batch_norms(model), images, labels, _recipe(iterations=3 * ROUND, batch_size=4),
                       Normalization(), watch_of("anp", should_stop, events), Execution())
    assert max(e.step for e in events) == ROUND
    assert [e.step for e in events if e.loss is not None] == [ROUND]
    steps = [e.progress for e in events if e.loss is None]  # one event an iteration, at its end
    assert steps == pytest.approx([i / (3 * ROUND) for i in range(1, ROUND + 1)])
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())


def test_anp_is_deterministic_for_a_seed():
    images, labels = noise_images(32)

    def run(seed: int):
        model, watch = _model(), watch_of("anp")
        masks = optimize_masks(model, batch_norms(model), images, labels, _recipe(iterations=6, seed=seed),
                               Normalization(), watch, Execution())
        return torch.cat(masks), watch.history

    (first, history), (second, again), (other, _) = run(0), run(0), run(1)
    assert torch.equal(first, second) and history == again
    assert (first < 1).any(), "the masks should have moved"
    assert not torch.equal(first, other)


def test_params_have_the_authors_defaults_and_are_strict():
    params = SanitizeParams(arch="wrn-16-1", num_classes=10, method="anp")
    assert (params.anp_eps, params.anp_steps, params.anp_alpha, params.anp_iterations, params.anp_lr,
            params.anp_batch_size, params.anp_threshold) == (0.4, 1, 0.2, 2000, 0.2, 128, 0.2)
    assert ROUND == 50, "docs/engine.md: cancellation checked, and a history row written, every 50 iterations"
    for bad in ({"anp_alpha": 1.5}, {"anp_eps": 0}, {"anp_threshold": -0.1}, {"anp_batch_size": 1},
                {"anp_steps": 0}, {"anp_iterationz": 5}):
        with pytest.raises(ValidationError):
            SanitizeParams(arch="wrn-16-1", num_classes=10, method="anp", **bad)


def test_the_command_line_accepts_anp_and_its_flags():
    import argparse

    from core.engine.commands import _params, add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["sanitize", "--arch", "wrn-16-1", "--num-classes", "10", "--checkpoint", "m.pt",
                              "--clean-data", "c.npz", "--out", "o.safetensors", "--method", "anp", "--anp-eps",
                              "0.3", "--anp-iterations", "100", "--anp-threshold", "0.25", "--anp-batch-size", "64"])
    params = _params(args)
    assert (params.method, params.anp_eps, params.anp_iterations, params.anp_threshold,
            params.anp_batch_size) == ("anp", 0.3, 100, 0.25, 64)
