"""Models people use, small and with random weights: insert, train one step, fold, export, verify.

The counts are checked against what running the model shows (tests/real/real_models.py counts
independently of insert's report): insert adds exactly the BatchNorms it reports, none on an
input a norm already made, at most one per unnormalized nonlinearity, and with --preserve the
eval-mode function stays. Each later step works or refuses in one line. Skipped where the
package is not installed (make test-real installs the `real` extra).
"""

from __future__ import annotations

import pytest

from tests.real.real_models import MODELS, installed
from tests.real.real_models import run_chain as _run_chain

_rows: dict = {}


def run_chain(name: str):
    """Each model's chain runs once per session: the tests below read the same row."""
    if name not in _rows:
        _rows[name] = _run_chain(name)
    return _rows[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_the_chain_on_a_real_model(name):
    if not installed(name):
        pytest.skip(f"{MODELS[name].package} is not installed (make test-real)")
    row = run_chain(name)
    assert row.nonlinearities > 0
    assert row.inserted == row.reported  # the report lists every BatchNorm the model gained
    assert row.bn_on_normalized == 0  # none on top of a norm's output, found by running the model
    assert row.inserted <= row.nonlinearities - row.normalized
    assert row.preserve_error <= 1e-4
    assert row.trained == "ok"
    # a HuggingFace ModelOutput stays one (fx writes every dict as a plain dict): `out.logits` works
    assert len(set(row.output_types.values())) == 1, row.output_types
    assert row.fold.startswith("ok"), row.fold
    # export may refuse a model, but then in one line with its reason; what it writes is verified
    assert row.export == "ok" or ("\n" not in row.export and ": " in row.export), row.export
    if row.export == "ok":
        assert row.verify == "PASSED"


def test_hf_mobilenet_v2_gets_no_batchnorm_on_its_conv_norm_act_blocks():
    """Issue 11: all 35 new BatchNorms sat on an existing one; every ReLU6 there is normalized."""
    if not installed("hf-mobilenet-v2"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-mobilenet-v2")
    assert (row.nonlinearities, row.normalized, row.inserted) == (35, 35, 0)


def test_hf_resnet_normalizes_only_the_activations_after_the_residual_add():
    if not installed("hf-resnet"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-resnet")
    assert (row.nonlinearities, row.normalized, row.inserted) == (5, 3, 2)


def test_hf_bert_is_traced_through_its_decorated_forward():
    """Every HF v5 forward sits behind `functools.wraps` decorators, which torch.fx called with
    the wrong arguments: BERT fell back to wrapping modules and its GELU got no BatchNorm."""
    if not installed("hf-bert"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-bert")
    assert row.tracing == "torch.fx"
    assert (row.nonlinearities, row.normalized, row.inserted) == (2, 0, 2)  # the MLP's GELU, the pooler's tanh


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-convbert", "hf-wav2vec2"])
def test_a_transformer_mlp_that_fx_cannot_trace_gets_a_batchnorm_over_its_features_that_folds(name):
    """The module-level fallback once skipped every activation on the last axis of (N, T, C), so
    these got none in their MLP. Now a BatchNorm over that axis, folded into the layer before it:
    GPT-2's Conv1D (weight stored (in, out)), the others' Linear."""
    if not installed(name):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain(name)
    assert row.tracing == "module-level fallback"
    assert row.verify == "PASSED", row
    # wav2vec2 also has a positional conv whose output a padding layer slices in time
    # (x[:, :, :-1]): its features stay in axis 1, and it gets a BatchNorm too, folded into the
    # conv though its weight is weight-normed (computed in each call from two parameters).
    assert row.inserted == (2 if name == "hf-wav2vec2" else 1) and row.fold == "ok", row


def test_hf_t5_is_traced_through_its_float16_clamps_and_exports():
    """Every T5 block clamps `if hidden_states.dtype == torch.float16:`, a value it computed: the
    tracer runs it on meta tensors, so the block traces and its ReLU gets a BatchNorm. Its
    attention adds a learned position bias as SDPA's mask, whose decomposition torch.onnx.export
    cannot export (pytorch/pytorch#136543): export writes the attention out and verifies."""
    if not installed("hf-t5-encoder"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-t5-encoder")
    assert row.tracing == "torch.fx"
    assert (row.nonlinearities, row.normalized, row.inserted) == (1, 0, 1) and row.fold == "ok"
    assert (row.export, row.verify) == ("ok", "PASSED"), row


def test_hf_swinv2_gets_no_batchnorm_on_its_position_bias_table():
    """Swin V2's blocks hold, besides the MLP's GELU, a ReLU in an MLP over a fixed table of
    relative coordinates: the same tensor in every batch, so it gets no BatchNorm, with why."""
    if not installed("hf-swinv2"):
        pytest.skip("transformers is not installed (make test-real)")
    import bngraph
    from bngraph.passes.insert_bn_before_activation import NOT_FROM_THE_INPUT

    row = run_chain("hf-swinv2")
    assert (row.inserted, row.reported) == (2, 2) and row.fold == "ok" and (row.export, row.verify) == ("ok", "PASSED")
    model, inputs = MODELS["hf-swinv2"].build()
    _, report = bngraph.insert(model.eval(), inputs)
    # Traced through (their window checks are guards now): the table's ReLUs are skipped in the graph.
    assert report.facts["tracing"] == "torch.fx"
    table = [r for r in report.sections["skipped"] if r["node"].endswith("continuous_position_bias_mlp_1")]
    assert len(table) == 2 and all(r["reason"].startswith(NOT_FROM_THE_INPUT) for r in table)


def test_hf_vitmae_is_refused_by_export_as_a_model_that_draws_random_numbers(tmp_path):
    """ViTMAE keeps a random subset of patches on every call: export writes nothing, and says the
    model itself gives another output on the same batch (not that rounding explains it)."""
    if not installed("hf-vitmae"):
        pytest.skip("transformers is not installed (make test-real)")
    import bngraph

    row = run_chain("hf-vitmae")
    assert row.export == "verification failed: not written"
    model, inputs = MODELS["hf-vitmae"].build()
    result = bngraph.export(model.eval(), inputs, tmp_path / "mae.onnx")
    assert not result and not (tmp_path / "mae.onnx").exists()
    assert "gives another output when run again on the same batch" in result.verification.lines()[-1]


def test_hf_swin_gets_batchnorms_inside_the_blocks_fx_keeps_whole():
    """Swin's layers pick their windows by the input's size (`if min(input_resolution) <=
    self.window_size:`), so each stays one call in insert's graph; the GELU module inside each
    gets its BatchNorm by running the model, and folds into the Linear before it."""
    if not installed("hf-swin"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-swin")
    assert row.tracing == "torch.fx"
    assert (row.nonlinearities, row.normalized, row.inserted, row.reported) == (2, 0, 2, 2), row
    assert row.fold == "ok" and (row.export, row.verify) == ("ok", "PASSED"), row


def test_hf_gpt2_with_its_cache_on_is_refused_by_export_with_the_way_out(tmp_path):
    """GPT-2 returns a DynamicCache where use_cache is on (its config's default): the exporter
    said only that the class is unknown; export names the output and the setting."""
    if not installed("hf-gpt2"):
        pytest.skip("transformers is not installed (make test-real)")
    import torch
    import transformers

    import bngraph

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2)).eval()
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(bngraph.UserError, match=r"output 'cache' is a transformers\.cache_utils\.DynamicCache.*use_cache=False"):
        bngraph.export(model, [tokens], tmp_path / "gpt2.onnx")
    assert not (tmp_path / "gpt2.onnx").exists()


def test_hf_mobilenet_v1_folds_after_training_steps():
    """Its fold differs from it by more than the fixed tolerance once its BatchNorms have seen a
    training step (tiny variances, eps 1e-3: rounding grows ~30x a layer), but no more than
    the model's own float32 rounding, which the check accepts (tests/test_fold_trust.py)."""
    if not installed("hf-mobilenet-v1"):
        pytest.skip("transformers is not installed (make test-real)")
    assert run_chain("hf-mobilenet-v1").fold == "ok"


def test_hf_vit_is_traced_through_its_dtype_check():
    """ViTModel.forward begins `if pixel_values.dtype != expected_dtype:`: the module-level
    fallback left its GELU without a BatchNorm."""
    if not installed("hf-vit"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-vit")
    assert row.tracing == "torch.fx"
    assert (row.nonlinearities, row.normalized, row.inserted) == (2, 0, 2)


def test_hf_whisper_is_traced_through_its_frame_check_and_every_gelu_gets_a_batchnorm():
    """Whisper's encoder checks `input_features.shape[-1] != expected_seq_length` first: torch.fx
    stopped there, and the fallback left the F.gelu after each conv without a BatchNorm."""
    if not installed("hf-whisper-encoder"):
        pytest.skip("transformers is not installed (make test-real)")
    row = run_chain("hf-whisper-encoder")
    assert row.tracing == "torch.fx"
    assert row.inserted == row.nonlinearities == 3  # both conv GELUs, and the MLP's inside the layer kept whole
    assert row.export == "ok" and row.verify == "PASSED"


def test_monai_segresnet_ds_is_traced_through_its_loop_over_the_shape_and_folds_every_batchnorm():
    """SegResNetDS checks each spatial size in a loop over `x.shape[2:]`: untraceable before, so
    fold folded module by module and left three BatchNorms no layer before could take."""
    if not installed("monai-segresnet-ds"):
        pytest.skip("monai is not installed (make test-real)")
    row = run_chain("monai-segresnet-ds")
    assert row.tracing == "torch.fx"
    assert row.fold == "ok" and row.export == "ok" and row.verify == "PASSED"


def test_hf_segformer_says_why_its_traced_graph_fails():
    """Segformer's traced graph fails on the example input: the fallback runs the model, and its
    note names the error, not only "fails"."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (make test-real)")
    import torch

    import bngraph

    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                          mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    _, report = bngraph.insert(model, [torch.randn(2, 3, 32, 32)])
    [said] = [note for note in report.notes if "the traced graph fails on the example input" in note]
    assert "Error: " in said.split("fails on the example input", 1)[1], said
