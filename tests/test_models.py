import pytest
import torch

from core.engine.attention import tap
from core.engine.errors import InputError
from core.engine.models import build_model, check_maps, check_runs, choose_distillation


@pytest.mark.parametrize(
    ("arch", "layers"),
    [("wrn-16-1", ("block1", "block2", "block3")), ("wrn-16-2", ("block1", "block2", "block3")),
     ("preact-resnet18", ("layer2", "layer3", "layer4")), ("resnet18", ("layer2", "layer3", "layer4")),
     ("mobilenet_v2", ("features.16", "features.17", "features.18")),
     # features.18 and .16, VGG's last convolutions, are overwritten by the ReLU(inplace=True) after each
     ("vgg11", ("features.17", "features.19", "features.20")),
     ("densenet121", ("features.transition3", "features.denseblock4", "features.norm5"))],
)
def test_registry_builds_models_with_default_layers(arch, layers):
    model = build_model(arch, 7)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    chosen = choose_distillation(arch, model, None, None)
    assert chosen.layers == layers and chosen.betas == (500.0, 1000.0, 1000.0)


def test_the_default_layers_record_three_distinct_maps_and_an_overwritten_layer_is_refused():
    """A hook on a convolution that a ReLU(inplace=True) follows records, once the pass is done, the ReLU's
    output: NAD would distil that one map twice. The defaults skip such a module, and a user's choice of one
    is refused, naming the module to choose instead."""
    model = build_model("vgg11", 10)
    chosen = choose_distillation("vgg11", model, None, None)
    with tap(model, chosen.layers) as outputs:
        model(torch.rand(2, 3, 32, 32))
    assert len({output.data_ptr() for output in outputs}) == 3
    with pytest.raises(InputError, match="module after 'features.18' overwrites its output"):
        choose_distillation("vgg11", model, ["features.18", "features.19"], [1.0, 1.0])


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize(("arch", "said"), [
    ("inception_v3", "inception_v3 cannot classify 32x32 images (Calculated padded input size"),
    ("googlenet", "googlenet answers a GoogLeNetOutputs in training mode, not 10 class scores an image"),
])
def test_a_model_that_cannot_classify_the_images_as_training_needs_is_refused_before_any_work(arch, said):
    """They failed mid-job as the generic internal error. The check leaves the model as it was: its training-mode
    pass would move BatchNorm's statistics."""
    model = build_model(arch, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as refused:
        check_runs(model, arch, 32, 10)
    assert str(refused.value).startswith(said)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    fits = build_model("wrn-16-1", 10).eval()
    before = {k: v.clone() for k, v in fits.state_dict().items()}
    check_runs(fits, "wrn-16-1", 32, 10)
    assert all(torch.equal(before[k], v) for k, v in fits.state_dict().items()) and not fits.training


def test_wrn_has_the_wideresnet_pytorch_parameter_layout():
    keys = build_model("wrn-16-1", 10).state_dict().keys()
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.running_mean",
            "fc.weight"} <= set(keys)


def test_cifar_resnets_have_a_3x3_stem_and_no_max_pool():
    for arch in ("resnet18", "preact-resnet18"):
        model = build_model(arch, 10)
        assert model.conv1.kernel_size == (3, 3)
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_torchvision_models_by_name():
    assert build_model("torchvision.resnet18", 3).fc.out_features == 3
    assert build_model("resnet18", 3).linear.out_features == 3


def test_unknown_arch_lists_known_names():
    with pytest.raises(InputError, match="wrn-D-W"):
        build_model("resnet19x", 10)


def test_unknown_layer_lists_module_names():
    model = build_model("wrn-16-1", 10)
    with pytest.raises(InputError, match=r"'block9'.*block1\.layer\.0"):
        choose_distillation("wrn-16-1", model, ["block9"], [1.0])


def test_custom_layers_need_matching_betas():
    model = build_model("wrn-16-1", 10)
    assert choose_distillation("wrn-16-1", model, ["block3"], [2000.0]).betas == (2000.0,)
    with pytest.raises(InputError, match="one beta per layer"):
        choose_distillation("wrn-16-1", model, ["block2", "block3"], None)
    with pytest.raises(InputError, match="2 betas for 3 layers: give one beta per layer"):  # the default layers
        choose_distillation("wrn-16-1", model, None, [500.0, 1000.0])


def test_a_layer_whose_output_is_no_feature_map_is_refused():
    """NAD cannot make an attention map of a linear layer's output, nor of the whole model's: the job failed at
    its first step as an internal error."""
    model = build_model("wrn-16-1", 10)
    check_maps(model, ("block1", "block3"), 32)
    for layers in (("block3", "fc"), ("",)):
        with pytest.raises(InputError, match=f"^{layers[-1]!r} gives no feature map"):
            check_maps(model, layers, 32)
    assert model.training  # as it was


def test_a_model_without_residual_groups_or_features_needs_its_layers_named():
    """No layers can be guessed for it; a job that names them runs."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(3600, 10))
    with pytest.raises(InputError, match="no default distillation layers for 'mine': choose them with `layers`"):
        choose_distillation("mine", model, None, None)
    assert choose_distillation("mine", model, ["0"], [1.0]).layers == ("0",)


@torch.no_grad()
def test_wrn_blocks_compute_as_wideresnet_pytorch():
    """A checkpoint of the NAD authors' WideResNet gives their outputs only if the forward pass is theirs too: a
    block whose width changes projects its activated input, relu(bn1(x)), not x, onto the shortcut."""
    torch.manual_seed(0)
    block = build_model("wrn-16-1", 10).eval().block2.layer[0]
    x = torch.randn(2, 16, 8, 8)
    activated = torch.relu(block.bn1(x))
    expected = block.convShortcut(activated) + block.conv2(torch.relu(block.bn2(block.conv1(activated))))
    torch.testing.assert_close(block(x.clone()), expected)


@torch.no_grad()
def test_preact_resnet18_pools_its_final_batch_norm_after_a_relu():
    """BackdoorBench's PreAct-ResNet18: logits = linear(mean over space of relu(bn(layer4 output)))."""
    torch.manual_seed(0)
    model = build_model("preact-resnet18", 10).eval()
    with tap(model, ["bn"]) as outputs:
        logits = model(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(logits, model.linear(torch.relu(outputs[0]).mean(dim=(2, 3))))
