"""The hand-written gradients of bngraph.training.fused_mlp against autograd and torch.optim.SGD."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bngraph
from bngraph.training.fused_mlp import NonzeroPixels, NotAnMLP, StackedMLP, feature_order, mlp_layers, prefix_widths
from bngraph.zoo import create_model

EXAMPLE = [torch.zeros(2, 1, 28, 28)]


def pair(seed: int, act=nn.Sigmoid, init_std=None):
    torch.manual_seed(seed)
    plain = create_model("mnist-mlp", act_layer=act, init_std=init_std)
    bn_net, _ = bngraph.insert(plain, EXAMPLE)
    with torch.no_grad():  # a fresh BN is the identity: make gamma and beta matter
        for bn in (m for m in bn_net.modules() if isinstance(m, nn.BatchNorm1d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return plain, bn_net


def reference_steps(models, xs, ys, lr, steps):
    """The plain PyTorch loop the fused step must reproduce."""
    models = [copy.deepcopy(m).train() for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    for step in range(steps):
        for k, (m, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            F.cross_entropy(m(xs[step][k]), ys[step][k]).backward()
            opt.step()
    return models


def assert_same_state(models, references, atol=2e-5):
    for model, ref in zip(models, references):
        mine, theirs = model.state_dict(), ref.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key].float(), theirs[key].float(), atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.ReLU])
def test_stacked_steps_match_autograd_per_net(act):
    # Two seeds x (plain, BN): two groups in one stack, each net with its own batches.
    (p0, b0), (p1, b1) = pair(0, act), pair(1, act)
    models = [p0, p1, b0, b1]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 60, 1, 28, 28, generator=gen) for _ in range(6)]
    ys = [torch.randint(0, 10, (4, 60), generator=gen) for _ in range(6)]
    references = reference_steps(models, xs, ys, lr=0.3, steps=6)
    stack = StackedMLP(models)
    for x, y in zip(xs, ys):
        stack.step(x.flatten(2), y, lr=0.3)
    stack.write_back(models)
    assert_same_state(models, references)


def test_one_batch_shared_by_all_nets_and_evaluation():
    plain, bn_net = pair(2, init_std=0.05)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.rand(60, 1, 28, 28, generator=gen) for _ in range(4)]
    ys = [torch.randint(0, 10, (60,), generator=gen) for _ in range(4)]
    references = reference_steps([plain, bn_net], [[x, x] for x in xs], [[y, y] for y in ys], lr=0.5, steps=4)
    stack = StackedMLP([plain, bn_net])
    for x, y in zip(xs, ys):
        stack.step(x.flatten(1), y, lr=0.5)  # [B, features]: expanded, not copied, for both nets

    x_test, y_test = torch.rand(300, 1, 28, 28, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    accuracy, quantiles = stack.evaluate(x_test, y_test, track_unit=7, chunk=128)
    stack.write_back([plain, bn_net])
    assert_same_state([plain, bn_net], references)
    for k, ref in enumerate(references):
        ref.eval()
        want = (ref(x_test).argmax(1) == y_test).float().mean()
        assert accuracy[k].item() == pytest.approx(want.item(), abs=1 / 300)
        # Figure 1(b, c) follows the input of the last hidden sigmoid: act3's input.
        captured = []
        ref.act3.register_forward_pre_hook(lambda mod, args: captured.append(args[0][:, 7]))
        with torch.no_grad():
            ref(x_test)
        want_q = torch.quantile(captured[0], torch.tensor([0.15, 0.5, 0.85]))
        torch.testing.assert_close(quantiles[k], want_q, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("which", ["plain", "bn"])
def test_one_net_alone_steps_and_evaluates_as_autograd(act, which):
    # One net per stack is what each process of `reproduce mnist` trains: the 2-D step.
    net = dict(zip(("plain", "bn"), pair(4, act, init_std=0.05)))[which]
    gen = torch.Generator().manual_seed(2)
    xs = [torch.rand(60, 1, 28, 28, generator=gen) for _ in range(5)]
    ys = [torch.randint(0, 10, (60,), generator=gen) for _ in range(5)]
    (reference,) = reference_steps([net], [[x] for x in xs], [[y] for y in ys], lr=0.5, steps=5)
    stack = StackedMLP([net])
    for x, y in zip(xs, ys):
        stack.step(x.flatten(1), y, lr=0.5)
    x_test, y_test = torch.rand(300, 1, 28, 28, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    accuracy, quantiles = stack.evaluate(x_test, y_test, track_unit=3, chunk=128)
    stack.write_back([net])
    assert_same_state([net], [reference])
    reference.eval()
    with torch.no_grad():
        want = (reference(x_test).argmax(1) == y_test).float().mean()
    assert accuracy.shape == (1,) and quantiles.shape == (1, 3)
    assert accuracy[0].item() == pytest.approx(want.item(), abs=1 / 300)


@pytest.mark.parametrize("which", ["plain", "bn", "both"])
def test_reading_only_the_used_features_trains_and_evaluates_as_autograd(which):
    # Images blank outside a random patch, as MNIST's are mostly background: each batch's first
    # layer reads only the features its images use, in the order feature_order sorts them.
    # "both": a stack of two nets, each with its own batches (reproduce's seeds).
    plain, bn_net = pair(5, init_std=0.05)
    nets = {"plain": [plain], "bn": [bn_net], "both": [plain, bn_net]}[which]
    K = len(nets)
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(600, 28, 28, generator=gen)
    for image in images:
        top, left = torch.randint(0, 14, (2,), generator=gen).tolist()
        blank = torch.ones(28, 28, dtype=torch.bool)
        blank[top : top + 14, left : left + 14] = False
        image[blank] = 0
    x_train = images.flatten(1)
    order = feature_order(x_train)
    ordered = x_train[:, order]
    widths = prefix_widths(ordered)
    for n in range(len(x_train)):  # the widths are exact: zero past, used at the edge
        assert not ordered[n, widths[n] :].any() and ordered[n, widths[n] - 1] != 0
    batches = [torch.stack([torch.randperm(600, generator=gen)[:60] for _ in nets]) for _ in range(5)]  # [K, 60]
    ys = [torch.randint(0, 10, (K, 60), generator=gen) for _ in batches]
    references = reference_steps(nets, [x_train[b].view(K, 60, 1, 28, 28) for b in batches], ys, lr=0.5, steps=5)
    stack = StackedMLP(nets, input_order=order)
    for b, y in zip(batches, ys):
        width = int(widths[b].max())
        assert width < 784  # the step reads a prefix, not every feature
        x = ordered[b]
        stack.step(x[0] if K == 1 else x, y[0] if K == 1 else y, lr=0.5, width=width)

    # The evaluation reads only the nonzero pixels, in chunks that split the images unevenly.
    y_test = torch.randint(0, 10, (600,), generator=gen)
    accuracy, quantiles = stack.evaluate(NonzeroPixels.of(ordered), y_test, track_unit=5, chunk=128)
    stack.write_back(nets)
    assert_same_state(nets, references)
    for k, reference in enumerate(references):
        reference.eval()
        captured = []
        reference.act3.register_forward_pre_hook(lambda mod, args: captured.append(args[0][:, 5]))
        with torch.no_grad():
            want = (reference(images.unsqueeze(1)).argmax(1) == y_test).float().mean()
        assert accuracy[k].item() == pytest.approx(want.item(), abs=1 / 600)
        want_q = torch.quantile(captured[0], torch.tensor([0.15, 0.5, 0.85]))
        torch.testing.assert_close(quantiles[k], want_q, atol=1e-4, rtol=1e-4)


def test_nonzero_pixels_times_a_weight_is_the_dense_product():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(50, 3, 4, 4, generator=gen) * (torch.rand(50, 3, 4, 4, generator=gen) < 0.2)
    x[7] = 0  # an image with no pixel at all
    x[8] = 1  # one with every pixel
    weight = torch.randn(48, 9, generator=gen)
    pixels = NonzeroPixels.of(x)
    assert len(pixels) == 50 and len(pixels.values) == int((x != 0).sum())
    for lo, hi in ((0, 50), (5, 9), (7, 8), (40, 64)):  # whole, a chunk, the empty image, past the end
        torch.testing.assert_close(pixels.times(weight, lo, hi), x.flatten(1)[lo:hi] @ weight)


def test_num_batches_tracked_counts_the_steps():
    _, bn_net = pair(3)
    stack = StackedMLP([bn_net])
    for _ in range(3):
        stack.step(torch.rand(8, 784), torch.randint(0, 10, (8,)), lr=0.1)
    stack.write_back([bn_net])
    assert bn_net.act1_bn.num_batches_tracked.item() == 3


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten, self.fc, self.act, self.head = nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)

    def forward(self, x):
        x = self.flatten(x)
        return self.head(self.act(self.fc(x)) + x)


@pytest.mark.parametrize(
    "model, reason",
    [
        (Residual(), "calls functions"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "expected Sigmoid or ReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), "Flatten"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2, bias=False)), "head"),
    ],
)
def test_other_models_are_refused_with_a_reason(model, reason):
    with pytest.raises(NotAnMLP, match=reason):
        mlp_layers(model)


def test_nets_of_different_widths_do_not_stack():
    with pytest.raises(NotAnMLP, match="widths"):
        StackedMLP([create_model("mnist-mlp"), create_model("mnist-mlp", hidden=(50, 100, 100))])
