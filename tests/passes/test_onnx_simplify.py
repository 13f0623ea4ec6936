import onnx_ir as ir
from bngraph.onnx_fold import fold_onnx
from bngraph.passes.onnx_simplify import onnx_simplify
from tests.onnx_models import conv_bn_net, mlp_bn_net
from tests.onnx_util import check_against_input, export_onnx, ops
from tests.passes.test_onnx_fold_bn_into_preceding_layer import LinearOnSequence
from tests.util import randomize_bn


def test_folded_sequence_linear_keeps_no_transpose_pair():
    original = export_onnx(randomize_bn(LinearOnSequence()), (2, 4, 6))
    folded, _ = fold_onnx(original)
    assert ops(folded).count("Transpose") == 0  # the pair around the BN cancelled
    assert check_against_input(original, folded)


def test_flatten_chain_becomes_one_reshape():
    original = export_onnx(mlp_bn_net(), (2, 1, 28, 28))
    model = ir.serde.deserialize_model(original)
    result = onnx_simplify(model)
    assert "Shape" not in ops(model) and ops(model).count("Reshape") <= 1
    assert result.changed
    assert check_against_input(original, model)


def test_leaves_a_training_mode_batchnorm_alone():
    original = export_onnx(conv_bn_net().train(), (2, 3, 12, 12), "preserve")
    model = ir.serde.deserialize_model(original)
    onnx_simplify(model)
    assert ops(model).count("BatchNormalization") == ops(original).count("BatchNormalization") == 4
