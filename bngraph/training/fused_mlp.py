"""Many small MLPs trained at once with hand-written gradients: the fast path of `reproduce mnist`.

The paper's MNIST net (Sec. 4.1) is a chain `Flatten -> (Linear -> [BatchNorm1d] -> act)* ->
Linear`. At batch 60 its matmuls take ~0.2 ms a step on one core, and eager autograd plus the
optimizer add more than that again in bookkeeping. So the nets of a reproduction (with and
without BN, times seeds) are stacked on a leading axis, K nets in all, and a step is ~40 tensor
ops shared by all of them, each gradient written out by hand:

    softmax + cross-entropy   d logits = (softmax(logits) - onehot(y)) / B
    linear  z = a W (+ b)     dW = a^T dz,  db = sum_batch dz,  da = dz W^T
    sigmoid a = s(y)          dy = da * a * (1 - a)                (aten.sigmoid_backward)
    BN (Algorithm 1)          torch's own kernels, native_batch_norm and its backward, the ones
                              nn.BatchNorm1d runs: the Kg nets of a group as Kg*F features

Each SGD update is fused into the matmul that computes its gradient (`W.baddbmm_(a^T, dz,
alpha=-lr)`). Nets with the same layer kinds form a group (a contiguous slice of the stack), so
bias and BN apply per group while the matmuls run once for all. `tests/test_fused_mlp.py`
checks the result against autograd and torch.optim.SGD. Plain SGD only: the paper's MNIST run
names no momentum. Anything else is `NotAnMLP`; train it with `bngraph.train`.

The first layer's two matmuls are ~70% of a step's arithmetic, and MNIST's images are mostly
background. With the input features ordered by how many training images use them
(`feature_order`), every image is zero past some width (`prefix_widths`), and a batch's first
layer reads only its widest image's prefix (611 of 784 features on MNIST: a step ~7% faster on
one core). An evaluation, 10,000 images at once, reads only their nonzero pixels
(`NonzeroPixels`: ~40% faster; both measured by benchmarks/mnist_widths.py). Exact: what they
skip are products with zero, and the weights a step does not update would get a zero update.

One module past 300 lines: reading a model into the stack, the hand-written step and the
evaluation share the stack's layout (which slice is which net and layer), and change together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from bngraph.training.track import QUANTILES  # Figure 1(b, c)

ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}


class NotAnMLP(ValueError):
    """The model is not a plain Linear[-BN]-act chain (the message says where it is not)."""


@dataclass(frozen=True)
class LayerKind:
    has_bias: bool
    has_bn: bool
    act: str | None  # None: the head


def mlp_layers(model: nn.Module) -> list[tuple[nn.Linear, nn.BatchNorm1d | None, LayerKind]]:
    """The (linear, bn, kind) chain of `model`, or NotAnMLP saying why not."""
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if not nodes or any(n.op != "call_module" for n in nodes):
        raise NotAnMLP("its forward calls functions, not only modules")
    for prev, node in zip(nodes, nodes[1:]):
        if node.args != (prev,) or node.kwargs or len(prev.users) != 1:
            raise NotAnMLP(f"{node.name} is not fed only by {prev.name}")
    mods = [gm.get_submodule(n.target) for n in nodes]
    if not isinstance(mods[0], nn.Flatten) or mods[0].start_dim != 1:
        raise NotAnMLP("it does not start with Flatten()")
    layers, i = [], 1
    while i < len(mods):
        linear = mods[i]
        if not isinstance(linear, nn.Linear):
            raise NotAnMLP(f"{nodes[i].name} is {type(linear).__name__}, expected Linear")
        bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm1d) else None
        j = i + 1 + (bn is not None)
        if bn is not None and not (bn.affine and bn.track_running_stats and bn.momentum is not None):
            raise NotAnMLP(f"{nodes[i + 1].name} is not an affine BN with a moving average")
        if j == len(mods):
            if bn is not None or linear.bias is None:
                raise NotAnMLP("its head is not a Linear with a bias")
            layers.append((linear, None, LayerKind(True, False, None)))
            return layers
        act = ACTIVATIONS.get(type(mods[j]))
        if act is None:
            raise NotAnMLP(f"{nodes[j].name} is {type(mods[j]).__name__}, expected Sigmoid or ReLU")
        layers.append((linear, bn, LayerKind(linear.bias is not None, bn is not None, act)))
        i = j + 1
    raise NotAnMLP("it has no head")


def feature_order(x: torch.Tensor) -> torch.Tensor:
    """The features of the training images `x` [N, F] by how many images use them (are nonzero
    there), most first: a permutation of range(F), to apply as x[:, order]."""
    return torch.argsort((x != 0).sum(0, dtype=torch.int32), descending=True, stable=True)


def prefix_widths(x: torch.Tensor) -> torch.Tensor:
    """For images `x` [N, F] in a `feature_order`, each one's width: it is zero past it."""
    places = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.int16 if x.shape[1] < 2**15 else torch.int32)
    return ((x != 0) * places).amax(1)  # int16 (2 bytes a pixel of MNIST): no [N, F] int64 on the way


@dataclass(frozen=True)
class NonzeroPixels:
    """Images [N, F] as their nonzero values, image by image (compressed rows): a first layer
    that reads them sums the weight rows each image uses (`torch.nn.functional.embedding_bag`),
    ~1/5 of the dense product's arithmetic on MNIST, whose pixels are 81% background. Exact as
    the dense product is: what it skips are products with zero (the sums' order differs, as
    between two matmul kernels)."""

    features: torch.Tensor  # [nnz] int64: the feature of each value, image 0's first
    values: torch.Tensor  # [nnz]
    starts: torch.Tensor  # [N + 1] int64: image i's values are [starts[i], starts[i + 1])

    @classmethod
    def of(cls, x: torch.Tensor) -> NonzeroPixels:
        x = x.flatten(1)
        used = x != 0
        starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=x.device), used.sum(1).cumsum(0)])
        return cls(used.nonzero()[:, 1].contiguous(), x[used], starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def times(self, weight: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Images [lo, hi) times `weight` [F, out]: [n, out], as the dense `x[lo:hi] @ weight`."""
        hi = min(hi, len(self))
        first, last = int(self.starts[lo]), int(self.starts[hi])
        return torch.nn.functional.embedding_bag(
            self.features[first:last], weight, self.starts[lo:hi] - first, mode="sum",
            per_sample_weights=self.values[first:last],
        )


@dataclass
class _StackedBN:
    """The BNs of one layer of Kg nets, flat [Kg * F]: one BatchNorm1d to torch's kernels."""

    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    momentum: float


class _Group:
    """The nets [start, stop) of the stack, which share layer kinds; their own bias/BN tensors."""

    def __init__(self, start: int, chains: list, K: int, device: torch.device):
        self.start, self.stop = start, start + len(chains)
        self.whole = len(chains) == K  # no slicing needed
        kinds = [kind for _, _, kind in chains[0]]

        def stack(get) -> torch.Tensor:
            return torch.stack([get(c).detach().float() for c in chains]).to(device)

        self.bias = [stack(lambda c, l=l: c[l][0].bias) if k.has_bias else None for l, k in enumerate(kinds)]
        # The step's views of each bias, made once (in-place updates keep them valid): for one
        # net the step is 2-D, `vec` [out] and `row` [out]; for a stack `vec` [Kg, out] and
        # `row` [Kg, 1, out], which broadcasts over the batch.
        one = K == 1
        self.bias_vec = [None if b is None else b[0] if one else b for b in self.bias]
        self.bias_row = [None if b is None else b[0] if one else b.unsqueeze(1) for b in self.bias]
        self.bn: list[_StackedBN | None] = []
        for l, k in enumerate(kinds):
            bns = [c[l][1] for c in chains]
            if not k.has_bn:
                self.bn.append(None)
            elif len({(b.eps, b.momentum) for b in bns}) != 1:
                raise NotAnMLP("the BNs of one layer differ in eps or momentum")
            else:
                flat = {
                    name: stack(lambda c, l=l, name=name: getattr(c[l][1], name)).flatten()
                    for name in ("weight", "bias", "running_mean", "running_var")
                }
                self.bn.append(
                    _StackedBN(flat["weight"], flat["bias"], flat["running_mean"], flat["running_var"],
                               bns[0].eps, bns[0].momentum)
                )

    def __len__(self) -> int:
        return self.stop - self.start


class StackedMLP:
    """K MLPs of equal widths as stacked tensors: `step` trains all, `evaluate` tests all.

    One net (K = 1, each process of `reproduce mnist`) steps with 2-D ops (mm, addmm), which
    cost less than their batched forms over a batch of one; a stack uses bmm and baddbmm.
    With `input_order` (a `feature_order`), `step` and `evaluate` take inputs in that order."""

    def __init__(self, models: Sequence[nn.Module], device: str | torch.device = "cpu",
                 input_order: torch.Tensor | None = None):
        self.device = torch.device(device)
        self.input_order = None if input_order is None else input_order.to(self.device)
        chains = [mlp_layers(m) for m in models]
        widths = {tuple(lin.weight.shape for lin, _, _ in c) for c in chains}
        if len(widths) != 1:
            raise NotAnMLP("the nets have different layer widths")
        acts = {kind.act for c in chains for _, _, kind in c[:-1]}
        if len(acts) != 1:
            raise NotAnMLP("the nets use different nonlinearities")
        self.sigmoid = acts.pop() == "sigmoid"
        self.K = len(models)
        # nn.Linear stores W as [out, in]; the stack keeps W^T, [K, in, out], for a W.
        self.weights = [
            torch.stack([c[l][0].weight.detach().float().t() for c in chains]).contiguous().to(self.device)
            for l in range(len(chains[0]))
        ]
        if input_order is not None:  # the first layer's rows in the order of its inputs
            self.weights[0] = self.weights[0][:, self.input_order].contiguous()
        self.groups: list[_Group] = []
        start = 0
        while start < self.K:
            stop = start + 1
            sig = [k for _, _, k in chains[start]]
            while stop < self.K and [k for _, _, k in chains[stop]] == sig:
                stop += 1
            self.groups.append(_Group(start, chains[start:stop], self.K, self.device))
            start = stop
        self.num_batches_tracked = 0
        self._one = self.K == 1
        self._w = [w[0] if self._one else w for w in self.weights]  # views: updates land in `weights`
        self._wt = [w.mT for w in self._w]
        self._mm = torch.mm if self._one else torch.bmm
        self._addmm = torch.addmm if self._one else torch.baddbmm
        self._addmm_ = torch.Tensor.addmm_ if self._one else torch.Tensor.baddbmm_
        self._ones: torch.Tensor | None = None

    # --- the training step --------------------------------------------------------------

    @torch.inference_mode()  # no autograd bookkeeping in torch's dispatcher: ~15% of a step's overhead
    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, width: int | None = None) -> None:
        """One SGD step of every net: x [K, B, features] or [B, features] (one batch for all
        nets: bmm reads the expanded view without a copy), y [K, B] or [B]. With `width`, every
        image of x is zero past its first `width` features (the largest of their `prefix_widths`),
        which are all the first layer reads.

        Each update is fused into the op that computes its gradient (`W.addmm_(a^T, dz,
        alpha=-lr)`), after that layer's backward has read the old values."""
        K, B = self.K, x.shape[-2]
        if self._one:
            a, y = x.reshape(B, -1), y.reshape(B)
        else:
            a, y = (x.expand(K, *x.shape) if x.dim() == 2 else x), y.expand(K, B)
        weights = self._w
        if width is not None:
            a = a[..., :width]
            weights = [weights[0][..., :width, :], *weights[1:]]
        groups, one_group = self.groups, len(self.groups) == 1
        inputs, saved = [], []  # each layer's input; per layer and group, what BN's backward needs
        for l, W in enumerate(weights[:-1]):
            inputs.append(a)
            if one_group and groups[0].bias[l] is not None:
                z = self._addmm(groups[0].bias_row[l], a, W)
            else:
                z = self._mm(a, W)
                for g in groups:
                    if g.bias[l] is not None:
                        (z if g.whole else z[g.start : g.stop]).add_(g.bias_row[l])
            layer_saved = []
            for g in groups:
                bn = g.bn[l]
                if bn is None:
                    layer_saved.append(None)
                    continue
                # BN of Kg nets as one BatchNorm1d of Kg*F features over the batch: torch's own
                # kernel (batch statistics, moving averages updated in place, as nn.BatchNorm1d).
                zg = z if g.whole else z[g.start : g.stop]
                flat = zg if self._one else zg.transpose(0, 1).reshape(B, -1)
                if not g.whole and flat.data_ptr() == zg.data_ptr():
                    flat = flat.clone()  # a view of z, which the BN output overwrites below
                out, save_mean, save_invstd = torch.native_batch_norm(
                    flat, bn.gamma, bn.beta, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
                )
                z = self._ungroup(g, out, z, zg)
                layer_saved.append((flat, save_mean, save_invstd))
            a = torch.sigmoid_(z) if self.sigmoid else torch.relu_(z)
            saved.append(layer_saved)

        # The head runs transposed, logits^T = W^T a^T [(K,) classes, B]: softmax over the
        # classes is then a reduction over rows, several times faster on the CPU than over a
        # last dimension of 10.
        head = len(self._w) - 1
        inputs.append(a)
        if one_group:
            logits = self._addmm(groups[0].bias_vec[head].unsqueeze(-1), self._wt[head], a.mT)
        else:
            logits = self._mm(self._wt[head], a.mT)
            for g in groups:
                (logits if g.whole else logits[g.start : g.stop]).add_(g.bias_vec[head].unsqueeze(-1))
        grad = torch.softmax(logits, -2)
        grad.scatter_add_(-2, y.unsqueeze(-2), self._minus_ones(B))
        grad.mul_(1.0 / B)  # the loss is the batch mean
        grad = grad.mT  # [(K,) B, classes] from here on

        for l in range(head, -1, -1):
            grad_in = self._mm(grad, self._wt[l]) if l > 0 else None  # before W changes
            for g in groups:
                if g.bias[l] is not None:
                    dg = grad if g.whole else grad[g.start : g.stop]
                    g.bias_vec[l].sub_(dg.sum(-2), alpha=lr)
            self._addmm_(weights[l], inputs[l].mT, grad, alpha=-lr)
            if grad_in is None:
                break  # the input images need no gradient
            if self.sigmoid:
                grad = torch.ops.aten.sigmoid_backward(grad_in, inputs[l])
            else:
                grad = torch.ops.aten.threshold_backward(grad_in, inputs[l], 0)
            for g, g_saved in zip(groups, saved[l - 1]):
                if g_saved is None:
                    continue
                flat, save_mean, save_invstd = g_saved
                bn = g.bn[l - 1]
                dg = grad if g.whole else grad[g.start : g.stop]
                d_flat, d_gamma, d_beta = torch.ops.aten.native_batch_norm_backward(
                    dg if self._one else dg.transpose(0, 1).reshape(B, -1), flat, bn.gamma, bn.running_mean,
                    bn.running_var, save_mean, save_invstd, True, bn.eps, [True, True, True],
                )
                bn.gamma.sub_(d_gamma, alpha=lr)
                bn.beta.sub_(d_beta, alpha=lr)
                grad = self._ungroup(g, d_flat, grad, dg)
        self.num_batches_tracked += 1

    def _ungroup(self, g, flat: torch.Tensor, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """A group's BN result `flat` [B, Kg*F] back in the stack's layout: the whole tensor when
        the group is every net, else written into `part` (its slice of `full`) and `full` returned."""
        out = flat if self._one else flat.view(flat.shape[0], len(g), -1).transpose(0, 1)
        if g.whole:
            return out
        part.copy_(out)
        return full

    def _minus_ones(self, B: int) -> torch.Tensor:
        shape = (1, B) if self._one else (self.K, 1, B)
        if self._ones is None or self._ones.shape != shape:
            self._ones = torch.full(shape, -1.0, device=self.device)
        return self._ones

    # --- state, evaluation and write-back -----------------------------------------------

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes (weights, biases, BN parameters and moving averages), in a
        fixed order: what another process needs to evaluate this stack (`load_state` of a stack
        of the same models and input order)."""
        tensors = list(self.weights)
        for g in self.groups:
            tensors += [b for b in g.bias if b is not None]
            for bn in g.bn:
                if bn is not None:
                    tensors += [bn.gamma, bn.beta, bn.running_mean, bn.running_var]
        return tensors

    @torch.no_grad()
    def load_state(self, tensors: Sequence) -> None:
        for mine, theirs in zip(self.state(), tensors, strict=True):
            mine.copy_(torch.as_tensor(theirs))

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor | NonzeroPixels, y: torch.Tensor, *, track_unit: int | None = None, chunk: int = 1000,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each net's accuracy on (x, y) [K] in inference mode (BN on its moving averages), and
        the QUANTILES of unit `track_unit`'s input to the last hidden nonlinearity [K, 3].

        Chunks of 1,000 examples keep each layer's activations in the L2 cache. Images given as
        `NonzeroPixels` (made once for many evaluations) cost the first layer ~35% less."""
        correct = torch.zeros(self.K, device=self.device)
        tracked = []
        hidden = len(self.weights) - 1
        W0 = self.weights[0]
        W0_wide = W0.transpose(0, 1).reshape(W0.shape[1], -1)  # [in, K*out]: one matmul for all
        for lo in range(0, len(x), chunk):
            if isinstance(x, NonzeroPixels):
                z = x.times(W0_wide, lo, lo + chunk)
            else:
                z = x[lo : lo + chunk].flatten(1) @ W0_wide
            n = z.shape[0]
            z = z if self._one else z.view(n, self.K, -1).transpose(0, 1).contiguous()
            for l in range(hidden):  # z: layer l's linear output
                for g in self.groups:
                    zg = z if g.whole else z[g.start : g.stop]
                    if g.bias[l] is not None:
                        zg.add_(g.bias_row[l])
                    bn = g.bn[l]
                    if bn is not None:
                        shape = (-1,) if self._one else (len(g), 1, -1)
                        scale = (bn.running_var + bn.eps).rsqrt_().mul_(bn.gamma)
                        zg.sub_(bn.running_mean.view(shape)).mul_(scale.view(shape))
                        zg.add_(bn.beta.view(shape))
                if l == hidden - 1 and track_unit is not None:
                    tracked.append(z[..., track_unit].reshape(self.K, n).clone())
                z = self._mm(torch.sigmoid_(z) if self.sigmoid else torch.relu_(z), self._w[l + 1])
            logits = z
            for g in self.groups:
                (logits if g.whole else logits[g.start : g.stop]).add_(g.bias_row[-1])
            correct += (logits.argmax(-1) == y[lo : lo + chunk]).sum(-1)
        accuracy = correct / len(x)
        if not tracked:
            return accuracy, None
        q = torch.tensor(QUANTILES, device=self.device)
        return accuracy, torch.quantile(torch.cat(tracked, 1), q, dim=1).t()

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy the trained stack into the modules it came from (weights, BN statistics)."""
        for k, model in enumerate(models):
            g = next(g for g in self.groups if g.start <= k < g.stop)
            i = k - g.start
            for l, (linear, bn, _) in enumerate(mlp_layers(model)):
                W = self.weights[l][k]
                if l == 0 and self.input_order is not None:  # back to the model's order of inputs
                    W = W.index_select(0, torch.argsort(self.input_order))
                linear.weight.copy_(W.t())
                if g.bias[l] is not None:
                    linear.bias.copy_(g.bias[l][i])
                if bn is not None:
                    stacked = g.bn[l]
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        flat = getattr(stacked, "gamma" if name == "weight" else "beta" if name == "bias" else name)
                        getattr(bn, name).copy_(flat.view(len(g), -1)[i])
                    bn.num_batches_tracked += self.num_batches_tracked
