"""Many small MLPs trained at once with hand-written gradients: the fast path of `reproduce mnist`.

The paper's MNIST net (Sec. 4.1) is a chain `Flatten -> (Linear -> [BatchNorm1d] -> act)* ->
Linear`. At batch 60 its matmuls take ~0.1 ms a step, and eager autograd plus the optimizer add
~1.5 ms of bookkeeping. So the nets of a reproduction (with and without BN, times seeds) are
stacked on a leading axis, K nets in all, and one step is ~80 tensor ops shared by all of them:
`bmm` for every layer, and each gradient written out by hand:

    softmax + cross-entropy   d logits = (softmax(logits) - onehot(y)) / B
    linear  z = a W (+ b)     dW = a^T dz,  db = sum_batch dz,  da = dz W^T
    sigmoid a = s(y)          dy = da * a * (1 - a)                (aten.sigmoid_backward)
    BN      y = g x^ + beta,  x^ = (z - mu) / sqrt(var + eps)      (Algorithm 1, biased var)
            dz = g / sqrt(var + eps) * (dy - (sum_batch dy + x^ * sum_batch(dy x^)) / B)

Nets with the same layer kinds form a group (a contiguous slice of the stack), so bias and BN
are applied per group on views while the matmuls run once for all. `tests/test_fused_mlp.py`
checks every gradient against autograd. Plain SGD only: the paper's MNIST run has no momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}
QUANTILES = (0.15, 0.50, 0.85)  # Figure 1(b, c)


class NotAnMLP(ValueError):
    """The model is not a plain Linear[-BN]-act chain; the caller uses the generic engine."""


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


_BN_TENSORS = ("gamma", "beta", "running_mean", "running_var")  # native_batch_norm's order
_BN_BACKWARD = ("gamma", "running_mean", "running_var")


class _Group:
    """The nets [start, stop) of the stack, which share layer kinds; their own bias/BN tensors."""

    def __init__(self, start: int, chains: list, device: torch.device):
        self.start, self.stop = start, start + len(chains)
        self.kinds = [kind for _, _, kind in chains[0]]
        stack = lambda get: torch.stack([get(c).detach().float() for c in chains]).to(device)  # noqa: E731
        self.bias = [stack(lambda c, l=l: c[l][0].bias) if k.has_bias else None for l, k in enumerate(self.kinds)]
        self.bn = []
        for l, k in enumerate(self.kinds):
            if not k.has_bn:
                self.bn.append(None)
                continue
            bns = [c[l][1] for c in chains]
            if len({(b.eps, b.momentum) for b in bns}) != 1:
                raise NotAnMLP("the BNs of one layer differ in eps or momentum")
            self.bn.append(
                {
                    "gamma": stack(lambda c, l=l: c[l][1].weight),
                    "beta": stack(lambda c, l=l: c[l][1].bias),
                    "running_mean": stack(lambda c, l=l: c[l][1].running_mean),
                    "running_var": stack(lambda c, l=l: c[l][1].running_var),
                    "eps": bns[0].eps,
                    "momentum": bns[0].momentum,
                }
            )

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def param_keys(self) -> list[tuple[str, int]]:
        keys = [("bias", l) for l, b in enumerate(self.bias) if b is not None]
        return keys + [(name, l) for l, bn in enumerate(self.bn) if bn is not None for name in ("gamma", "beta")]

    def params(self) -> list[torch.Tensor]:
        return [self.bias[l] if name == "bias" else self.bn[l][name] for name, l in self.param_keys()]


class StackedMLP:
    """K MLPs of equal widths as stacked tensors: `step` trains all, `evaluate` tests all."""

    def __init__(self, models: Sequence[nn.Module], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        chains = [mlp_layers(m) for m in models]
        widths = {tuple(lin.weight.shape for lin, _, _ in c) for c in chains}
        if len(widths) != 1:
            raise NotAnMLP("the nets have different layer widths")
        acts = {kind.act for c in chains for _, _, kind in c[:-1]}
        if len(acts) != 1:
            raise NotAnMLP("the nets use different nonlinearities")
        self.act = acts.pop()
        self.K = len(models)
        # nn.Linear stores W as [out, in]; the stack keeps W^T, [K, in, out], for a W.
        self.weights = [
            torch.stack([c[l][0].weight.detach().float().t() for c in chains]).contiguous().to(self.device)
            for l in range(len(chains[0]))
        ]
        self.groups: list[_Group] = []
        start = 0
        while start < self.K:
            stop = start + 1
            sig = [k for _, _, k in chains[start]]
            while stop < self.K and [k for _, _, k in chains[stop]] == sig:
                stop += 1
            self.groups.append(_Group(start, chains[start:stop], self.device))
            start = stop
        self.num_batches_tracked = 0

    # --- the training step --------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One SGD step of every net: x [K, B, features] or [B, features] (one batch for all
        nets: bmm reads the expanded view without a copy), y [K, B] or [B]."""
        K, B = self.K, x.shape[-2]
        a = x.expand(K, *x.shape) if x.dim() == 2 else x
        inputs, saved = [], []  # each layer's input; per layer and group, what BN's backward needs
        for l, W in enumerate(self.weights[:-1]):
            inputs.append(a)
            z = torch.bmm(a, W)
            group_saved = []
            for g in self.groups:
                zg = z[g.slice]
                if g.bias[l] is not None:
                    zg.add_(g.bias[l].unsqueeze(1))
                bn = g.bn[l]
                if bn is None:
                    group_saved.append(None)
                    continue
                # BN of Kg nets as one BatchNorm1d of Kg*F features over the batch: torch's own
                # kernel (batch statistics, moving averages updated in place, as nn.BatchNorm1d).
                flat = zg.transpose(0, 1).reshape(B, -1)
                out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                    flat, *(bn[k].view(-1) for k in _BN_TENSORS), True, bn["momentum"], bn["eps"]
                )
                zg.copy_(out.view(B, len(g), -1).transpose(0, 1))
                group_saved.append((flat, save_mean, save_invstd))
            a = torch.sigmoid_(z) if self.act == "sigmoid" else torch.relu_(z)
            saved.append(group_saved)
        inputs.append(a)
        W_head = self.weights[-1]
        logits = torch.bmm(a, W_head)
        for g in self.groups:
            logits[g.slice].add_(g.bias[-1].unsqueeze(1))
        grad = torch.softmax(logits, -1)
        grad.scatter_add_(2, y.expand(K, B).unsqueeze(2), self._minus_ones(K, B))
        grad.mul_(1.0 / B)  # the loss is the batch mean

        head = len(self.weights) - 1
        grads_w = [torch.bmm(a.transpose(1, 2), grad)]
        # Per group, the gradient of each tensor of `_Group.params()`, keyed as there.
        grads_g: list[dict] = [{("bias", head): grad[g.slice].sum(1)} for g in self.groups]
        grad = torch.bmm(grad, W_head.transpose(1, 2))
        for l in range(head - 1, -1, -1):
            if self.act == "sigmoid":
                grad = torch.ops.aten.sigmoid_backward(grad, inputs[l + 1])
            else:
                grad = torch.ops.aten.threshold_backward(grad, inputs[l + 1], 0)
            for g, g_grads, g_saved in zip(self.groups, grads_g, saved[l]):
                dg = grad[g.slice]
                if g_saved is not None:
                    flat, save_mean, save_invstd = g_saved
                    bn = g.bn[l]
                    d_flat, d_gamma, d_beta = torch.ops.aten.native_batch_norm_backward(
                        dg.transpose(0, 1).reshape(B, -1), flat, *(bn[k].view(-1) for k in _BN_BACKWARD),
                        save_mean, save_invstd, True, bn["eps"], [True, True, True],
                    )
                    dg.copy_(d_flat.view(B, len(g), -1).transpose(0, 1))
                    g_grads[("gamma", l)] = d_gamma.view(len(g), -1)
                    g_grads[("beta", l)] = d_beta.view(len(g), -1)
                if g.bias[l] is not None:
                    g_grads[("bias", l)] = dg.sum(1)
            grads_w.append(torch.bmm(inputs[l].transpose(1, 2), grad))
            if l > 0:  # the input images need no gradient
                grad = torch.bmm(grad, self.weights[l].transpose(1, 2))
        grads_w.reverse()
        params, grads = list(self.weights), grads_w
        for g, g_grads in zip(self.groups, grads_g):
            params += g.params()
            grads += [g_grads[key] for key in g.param_keys()]
        torch._foreach_add_(params, grads, alpha=-lr)
        self.num_batches_tracked += 1

    def _minus_ones(self, K: int, B: int) -> torch.Tensor:
        if getattr(self, "_ones_cache", None) is None or self._ones_cache.shape != (K, B, 1):
            self._ones_cache = torch.full((K, B, 1), -1.0, device=self.device)
        return self._ones_cache

    # --- evaluation and write-back ------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, *, track_unit: int | None = None, chunk: int = 10000
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Test accuracy of each net [K], and the QUANTILES of unit `track_unit`'s input to the
        last hidden nonlinearity [K, 3], with BN on its moving averages (inference mode)."""
        correct = torch.zeros(self.K, device=self.device)
        tracked = []
        for lo in range(0, x.shape[0], chunk):
            a = x[lo : lo + chunk].flatten(1)
            n = a.shape[0]
            # One matmul for the first layer of all nets: [n, in] @ [in, K*out].
            W0 = self.weights[0]
            z = (a @ W0.transpose(0, 1).reshape(W0.shape[1], -1)).view(n, self.K, -1).transpose(0, 1)
            for l in range(len(self.weights) - 1):
                if l > 0:
                    z = torch.bmm(a, self.weights[l])
                z = z.contiguous()
                for g in self.groups:
                    zg = z[g.slice]
                    if g.bias[l] is not None:
                        zg.add_(g.bias[l].unsqueeze(1))
                    bn = g.bn[l]
                    if bn is not None:
                        scale = (bn["running_var"] + bn["eps"]).rsqrt() * bn["gamma"]
                        zg.sub_(bn["running_mean"].unsqueeze(1)).mul_(scale.unsqueeze(1))
                        zg.add_(bn["beta"].unsqueeze(1))
                if l == len(self.weights) - 2 and track_unit is not None:
                    tracked.append(z[:, :, track_unit].clone())
                a = torch.sigmoid_(z) if self.act == "sigmoid" else torch.relu_(z)
            logits = torch.bmm(a, self.weights[-1])
            for g in self.groups:
                logits[g.slice].add_(g.bias[-1].unsqueeze(1))
            correct += (logits.argmax(-1) == y[lo : lo + chunk]).sum(1)
        accuracy = correct / x.shape[0]
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
                linear.weight.copy_(self.weights[l][k].t())
                if g.bias[l] is not None:
                    linear.bias.copy_(g.bias[l][i])
                if bn is not None:
                    st = g.bn[l]
                    bn.weight.copy_(st["gamma"][i])
                    bn.bias.copy_(st["beta"][i])
                    bn.running_mean.copy_(st["running_mean"][i])
                    bn.running_var.copy_(st["running_var"][i])
                    bn.num_batches_tracked.fill_(bn.num_batches_tracked.item() + self.num_batches_tracked)
