"""Models people use (the `real` extra), small, with random weights, and the whole chain on each.

    MODELS                      name -> builder of (model, example inputs); the package it needs
    count_nonlinearities(m, x)  what running the model shows, independently of insert's report
    run_chain(name)             insert, train one step, fold, export, verify: a row of outcomes

Used by tests/real/test_real_models.py and benchmarks/real_models.py (the README's table).
The count here is deliberately not bngraph's own: activation modules by type and by
HuggingFace's / efficientnet-pytorch's class names, nonlinearities called as functions by a
TorchFunctionMode, and "already normalized" as "the input shares storage, unchanged, with a
norm module's output" (which sees through views such as LeViT's flatten/reshape_as).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class RealModel:
    package: str  # import name; its distribution is in the `real` extra
    build: Callable[[], tuple[nn.Module, list[torch.Tensor]]]


def _image(n=2, c=3, size=32):
    return [torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0))]


def _hf(config_name: str, model_name: str, **config):
    def build():
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        return model, _image()

    return build


def _hf_text(config_name: str, model_name: str, **config):
    def build():
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        tokens = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
        return model, [tokens]

    return build


def _hf_audio(config_name: str, model_name: str, **config):
    def build():
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        return model, [torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))]  # 0.1 s at 16 kHz

    return build


def _hf_whisper_encoder():
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                        num_mel_bins=8, max_source_positions=16)
    # 32 frames of 8 mel bins: the length its forward checks (2 x max_source_positions)
    return transformers.WhisperModel(config).encoder, [torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))]


def _monai_segresnet_ds():
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    model = SegResNetDS(spatial_dims=2, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1), norm="batch")
    return model, _image(c=1)


def _monai_basic_unet():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)), _image(c=1)


def _monai_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    return model, _image(c=1)


def _x_transformers():
    from x_transformers import Encoder, TransformerWrapper

    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=Encoder(dim=16, depth=1, heads=2))
    return model, [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))]


def _efficientnet_pytorch():
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0", width_coefficient=0.25, depth_coefficient=0.25, image_size=32,
                                   num_classes=10)
    return model, _image()


MODELS: dict[str, RealModel] = {
    "hf-resnet": RealModel("transformers", _hf("ResNetConfig", "ResNetModel", embedding_size=8, hidden_sizes=[8, 16],
                                               depths=[1, 1], layer_type="basic")),
    "hf-mobilenet-v2": RealModel("transformers", _hf("MobileNetV2Config", "MobileNetV2Model", depth_multiplier=0.35,
                                                     image_size=32)),
    "hf-convnext": RealModel("transformers", _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16], depths=[1, 1],
                                                 num_stages=2, image_size=32)),
    "hf-levit": RealModel("transformers", _hf("LevitConfig", "LevitModel", image_size=32, hidden_sizes=[16, 32],
                                              num_attention_heads=[1, 2], depths=[1, 1], key_dim=[8, 8],
                                              mlp_ratio=[2, 2], attention_ratio=[2, 2],
                                              down_ops=[["Subsample", 8, 1, 2, 2, 2]])),
    "hf-efficientnet": RealModel("transformers", _hf("EfficientNetConfig", "EfficientNetModel", image_size=32,
                                                     width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128)),
    "hf-mobilenet-v1": RealModel("transformers", _hf("MobileNetV1Config", "MobileNetV1Model", depth_multiplier=0.25,
                                                     image_size=32)),
    "hf-bert": RealModel("transformers", _hf_text("BertConfig", "BertModel", vocab_size=100, hidden_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
    "hf-vit": RealModel("transformers", _hf("ViTConfig", "ViTModel", image_size=32, patch_size=8, hidden_size=16,
                                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
    "hf-dinov2": RealModel("transformers", _hf("Dinov2Config", "Dinov2Model", image_size=32, patch_size=8, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)),
    # Swin's layers pick their windows by the input's size: kept whole, their GELUs wrapped by running
    "hf-swin": RealModel("transformers", _hf("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=8,
                                             depths=[1, 1], num_heads=[1, 2], window_size=4)),
    # Swin V2 also runs an MLP over a table of coordinates (its position bias): no BatchNorm there
    "hf-swinv2": RealModel("transformers", _hf("Swinv2Config", "Swinv2Model", image_size=32, patch_size=4, embed_dim=8,
                                               depths=[1, 1], num_heads=[1, 2], window_size=4)),
    # ViTMAE masks patches at random in eval mode too: no exported file can be checked against it
    "hf-vitmae": RealModel("transformers", _hf("ViTMAEConfig", "ViTMAEModel", image_size=32, patch_size=8, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
    "hf-t5-encoder": RealModel("transformers", _hf_text("T5Config", "T5EncoderModel", vocab_size=100, d_model=16, d_kv=8,
                                                        d_ff=32, num_layers=1, num_heads=2)),
    # fx cannot trace these at the top (shape branches, caches): the module-level fallback
    "hf-gpt2": RealModel("transformers", _hf_text("GPT2Config", "GPT2Model", vocab_size=100, n_embd=16, n_layer=1,
                                                  n_head=2, use_cache=False)),
    "hf-convbert": RealModel("transformers", _hf_text("ConvBertConfig", "ConvBertModel", vocab_size=100, hidden_size=16,
                                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                      embedding_size=16)),
    "hf-wav2vec2": RealModel("transformers", _hf_audio("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                       conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                                       feat_extract_norm="layer")),
    "hf-whisper-encoder": RealModel("transformers", _hf_whisper_encoder),
    "monai-basic-unet": RealModel("monai", _monai_basic_unet),
    "monai-segresnet-ds": RealModel("monai", _monai_segresnet_ds),
    "monai-unet": RealModel("monai", _monai_unet),
    "x-transformers": RealModel("x_transformers", _x_transformers),
    "efficientnet-pytorch": RealModel("efficientnet_pytorch", _efficientnet_pytorch),
}


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODELS[name].package) is not None


# --- The independent count ---------------------------------------------------------------

_FUNCTIONS = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "elu", "elu_", "selu", "celu", "gelu",
              "silu", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish",
              "hardsigmoid", "softplus", "softsign", "logsigmoid"}
_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
            nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)
# The activation classes of the packages above, by name (transformers' activations.py,
# efficientnet-pytorch's utils.py, monai's blocks/activation.py).
_CLASS_NAMES = {"GELUActivation", "SiLUActivation", "NewGELUActivation", "QuickGELUActivation", "FastGELUActivation",
                "GELUTanh", "PytorchGELUTanh", "AccurateGELUActivation", "MishActivation", "ReLUSquaredActivation",
                "MemoryEfficientSwish", "Swish", "MemoryEfficientMish", "LaplaceActivation", "ClippedGELUActivation"}


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _MODULES) or type(m).__name__ in _CLASS_NAMES


@dataclass
class Count:
    nonlinearities: int = 0  # calls, modules and functions
    normalized: int = 0  # of those, with an input fresh out of a norm
    functional: int = 0
    bn_inputs_normalized: int = 0  # BatchNorm calls whose input was already normalized
    sites: list[str] = field(default_factory=list)


class _Counter(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.count = Count()
        self.norm_outputs: dict[int, int] = {}  # storage address -> version when a norm wrote it
        self.kept: list[torch.Tensor] = []  # alive, so that no later tensor gets their addresses
        self.inside: list[nn.Module] = []
        self.paths = {id(m): p for p, m in model.named_modules()}

    def _fresh_norm_output(self, x) -> bool:
        if not isinstance(x, torch.Tensor):
            return False
        return self.norm_outputs.get(x.untyped_storage().data_ptr()) == x._version

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _FUNCTIONS and not any(_is_activation(m) for m in self.inside):
            self.count.nonlinearities += 1
            self.count.functional += 1
            self.count.normalized += self._fresh_norm_output(args[0] if args else None)
        return func(*args, **(kwargs or {}))

    def pre_hook(self, module, args):
        self.inside.append(module)
        x = next((a for a in tree_leaves(args) if isinstance(a, torch.Tensor)), None)
        if _is_activation(module) and not any(_is_activation(m) for m in self.inside[:-1]):
            self.count.nonlinearities += 1
            normalized = self._fresh_norm_output(x)
            self.count.normalized += normalized
            self.count.sites.append(f"{self.paths.get(id(module), '?')}{' (normalized)' if normalized else ''}")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and self._fresh_norm_output(x):
            self.count.bn_inputs_normalized += 1

    def hook(self, module, args, output):
        self.inside.pop()
        if _is_norm(module) and isinstance(output, torch.Tensor):
            self.norm_outputs[output.untyped_storage().data_ptr()] = output._version
            self.kept.append(output)


def count_nonlinearities(model: nn.Module, example_inputs) -> Count:
    """Run `model` once in eval mode and count its nonlinearity calls (see the module docstring)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    counter = _Counter(model)
    handles = [register_module_forward_pre_hook(counter.pre_hook), register_module_forward_hook(counter.hook)]
    was_training = model.training
    try:
        with torch.no_grad(), counter:
            model.eval()(*example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.count


def count_batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --- The chain ------------------------------------------------------------------------------


@dataclass
class ChainRow:
    model: str
    tracing: str = ""
    nonlinearities: int = 0
    normalized: int = 0
    inserted: int = 0  # BatchNorms the inserted model has beyond the original's
    reported: int = 0  # rows in insert's report
    skipped: list[dict] = field(default_factory=list)  # insert's skip rows
    bn_on_normalized: int = 0  # new BatchNorms whose input a norm made: must be 0
    preserve_error: float = float("nan")  # max |insert(preserve) - original| / max |original|, eval mode
    trained: str = ""
    fold: str = ""
    fold_notes: list[str] = field(default_factory=list)  # the fold report's
    output_types: dict[str, str] = field(default_factory=dict)  # what each model returns: original, inserted, folded
    export: str = ""
    verify: str = ""
    seconds: float = 0.0


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _loss(output) -> torch.Tensor:
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def _seeded(model: nn.Module, inputs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model(*inputs)


def run_chain(name: str, out_dir: Path | None = None) -> ChainRow:
    """insert(preserve) -> one SGD step in train mode -> fold -> export -> verify, on model `name`;
    each step's outcome is "ok" or the one-line reason bngraph gave (a UserError or CheckFailed)."""
    import bngraph
    from bngraph.errors import CheckFailed, UserError

    started = time.perf_counter()
    model, inputs = MODELS[name].build()
    model.eval()
    row = ChainRow(name)
    before = count_nonlinearities(model, inputs)
    row.nonlinearities, row.normalized = before.nonlinearities, before.normalized
    bn_model, report = bngraph.insert(model, inputs, preserve=True)
    row.tracing = report.facts.get("tracing", "?")
    row.reported = len(report.sections["inserted"])
    row.skipped = list(report.sections["skipped"])
    row.inserted = count_batch_norms(bn_model) - count_batch_norms(model)
    row.bn_on_normalized = count_nonlinearities(bn_model, inputs).bn_inputs_normalized - before.bn_inputs_normalized
    with torch.no_grad():  # under one seed each: a model that draws random numbers (ViTMAE) draws the same
        want, got = (_seeded(m.eval(), inputs) for m in (model, bn_model))
    row.output_types = {"original": type(want).__name__, "inserted": type(got).__name__}
    want, got = tree_leaves(want), tree_leaves(got)
    pairs = [(a, b) for a, b in zip(want, got) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    row.preserve_error = max((float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in pairs), default=0.0)
    bn_model.train()
    optimizer = torch.optim.SGD(bn_model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    _loss(bn_model(*inputs)).backward()
    optimizer.step()
    row.trained = "ok"
    bn_model.eval()
    folded = None
    try:
        folded, fold_report = bngraph.fold(bn_model, inputs)
        with torch.no_grad():
            row.output_types["folded"] = type(_seeded(folded, inputs)).__name__
        row.fold_notes = list(fold_report.notes)
        left = fold_report.facts.get("batchnorms_after", 0)
        row.fold = f"ok, {left} BN left" if left else "ok"
    except (UserError, CheckFailed) as err:
        row.fold = _first_line(err)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir or tmp) / f"{name}.onnx"
        try:
            result = bngraph.export(bn_model, inputs, path)
            row.export = "ok" if result else "verification failed: not written"
            row.verify = "PASSED" if result and path.is_file() else "FAILED"
        except (UserError, CheckFailed) as err:
            row.export = _first_line(err)
            row.verify = "-"
    row.seconds = round(time.perf_counter() - started, 1)
    return row
