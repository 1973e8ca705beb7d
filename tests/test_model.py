import numpy as np
import pytest
import torch
import torchvision

from pipeline.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, AlexNet, ImageClassifier

# The seed's table: weights (no biases) of conv1..conv5, fc6..fc8.
PAPER_WEIGHTS = [23_232, 307_200, 663_552, 884_736, 589_824, 37_748_736, 16_777_216, 4_096_000]
PAPER_TOTAL = 61_100_840


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_layer_weight_counts_match_the_seed_table():
    model = AlexNet()
    assert [layer.weight.numel() for layer in _layers(model)] == PAPER_WEIGHTS
    assert sum(p.numel() for p in model.parameters()) == PAPER_TOTAL


@pytest.mark.parametrize("lrn", [False, True])
def test_torchvision_weights_load_strictly(lrn):
    reference = torchvision.models.alexnet(weights=None)
    model = AlexNet(lrn=lrn)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours == theirs
    model.load_state_dict(reference.state_dict(), strict=True)


def test_without_lrn_it_computes_what_torchvision_computes():
    reference = torchvision.models.alexnet(weights=None).eval()
    model = AlexNet().eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(model(x), reference(x))


def test_lrn_is_torch_local_response_norm_after_relu1_and_relu2():
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, lrn=True).eval()
    f, c = model.features, model.classifier
    lrn = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    relu = torch.relu
    x = torch.randn(2, 3, 224, 224) * 50  # large activations, so the normalisation matters
    h = torch.nn.functional.max_pool2d(lrn(relu(f[0](x))), 3, 2)
    h = torch.nn.functional.max_pool2d(lrn(relu(f[3](h))), 3, 2)
    h = relu(f[10](relu(f[8](relu(f[6](h))))))
    h = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.max_pool2d(h, 3, 2), 6), 1)
    expected = c[6](relu(c[4](relu(c[1](h)))))
    torch.testing.assert_close(model(x), expected)
    without = AlexNet(num_classes=7, lrn=False).eval()
    without.load_state_dict(model.state_dict())
    assert not torch.allclose(without(x), expected)  # the LRN layers are really there


def test_lrn_constants_match_the_paper_formula_in_float64():
    """b = a / (k + α/n · Σ_{|j-i|≤n/2} a_j²)^β — α divided by n, as cuda-convnet and Caffe do."""
    a = np.random.default_rng(0).normal(0, 30, (1, 8, 3, 3))
    n, half = LRN_SIZE, LRN_SIZE // 2
    expected = np.empty_like(a)
    for i in range(a.shape[1]):
        window = a[:, max(0, i - half) : i + half + 1]
        expected[:, i] = a[:, i] / (LRN_K + LRN_ALPHA / n * (window**2).sum(axis=1)) ** LRN_BETA
    lrn = torch.nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    np.testing.assert_allclose(lrn(torch.from_numpy(a)).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("size", [224, 64, 63])
def test_output_shape_for_full_and_small_inputs(size):
    out = AlexNet(num_classes=10, lrn=True).eval()(torch.randn(3, 3, size, size))
    assert out.shape == (3, 10)


def test_inputs_below_63_pixels_are_rejected():
    with pytest.raises(RuntimeError):
        AlexNet().eval()(torch.randn(1, 3, 62, 62))


def test_paper_init_draws_weights_from_n_0_001_and_sets_biases():
    torch.manual_seed(0)
    layers = _layers(AlexNet(init="paper"))
    for layer in layers:
        assert abs(layer.weight.std().item() - 0.01) < 0.001
        assert abs(layer.weight.mean().item()) < 0.001
    biases = [layer.bias.unique().tolist() for layer in layers]
    # conv1 conv2 conv3 conv4 conv5 fc6 fc7 fc8
    assert biases == [[0.0], [1.0], [0.0], [1.0], [1.0], [1.0], [1.0], [0.0]]
    assert _layers(AlexNet(init="paper", paper_bias=0.1))[1].bias.unique().tolist() == pytest.approx([0.1])


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="init must be one of"):
        AlexNet(init="xavier")


def test_image_classifier_takes_uint8_nhwc_and_normalises():
    torch.manual_seed(0)
    net = AlexNet(num_classes=5).eval()
    model = ImageClassifier(net, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).eval()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1).double()) / torch.tensor([0.2, 0.25, 0.3]).view(
        1, 3, 1, 1
    ).double()
    torch.testing.assert_close(model(images), net(x.float()), rtol=1e-4, atol=1e-5)


def test_fc_width_narrows_fc6_and_fc7_and_keeps_every_other_layer():
    narrow, full = AlexNet(num_classes=10, fc_width=64), AlexNet(num_classes=10)
    narrow_shapes = {k: tuple(v.shape) for k, v in narrow.state_dict().items()}
    full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    changed = {k for k in full_shapes if narrow_shapes[k] != full_shapes[k]}
    assert changed == {f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")} - {"classifier.6.bias"}
    assert narrow_shapes["classifier.1.weight"] == (64, 9216) and narrow_shapes["classifier.4.weight"] == (64, 64)
    assert narrow_shapes["classifier.6.weight"] == (10, 64)
    convs = sum(layer.weight.numel() + layer.bias.numel() for layer in _layers(narrow)[:5])
    assert sum(p.numel() for p in narrow.parameters()) == convs + (9216 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)
    assert narrow.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    before_the_option = {"lrn": False, "init": "torchvision", "dropout": 0.5, "paper_bias": 1.0}  # an old checkpoint's
    assert AlexNet.from_config(10, before_the_option).classifier[1].out_features == 4096
