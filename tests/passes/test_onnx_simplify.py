import pytest
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


def _graph(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_keeps_a_small_epsilon_and_what_it_guards():
    # onnxscript's no-op rules match their constants within a tolerance: `x + 1e-8` became x, and
    # log(relu(x) + 1e-8) became -inf wherever the ReLU gave 0.
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    value = helper.make_tensor_value_info
    original = _graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "eps"], ["a"]),
         helper.make_node("Mul", ["a", "one"], ["m"]), helper.make_node("Log", ["m"], ["y"])],
        [value("x", TensorProto.FLOAT, [2, 8])], [value("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(1e-8, np.float32), "eps"),
         numpy_helper.from_array(np.array(1.000001, np.float32), "one")],
    )
    model = ir.serde.deserialize_model(original)
    onnx_simplify(model)
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (original, ir.serde.serialize_model(model))]
    assert np.isfinite(run[1]).all()
    np.testing.assert_array_equal(run[0], run[1])


def test_a_dilated_same_padded_conv_keeps_its_auto_pad():
    # The pad normalization computed SAME pads as if the dilation were 1: the file then failed
    # shape inference (a traceback in fold).
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    value = helper.make_tensor_value_info
    weights = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    original = _graph([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", dilations=[2, 2])],
                      [value("x", TensorProto.FLOAT, [1, 3, 8, 8])], [value("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [weights])
    model = ir.serde.deserialize_model(original)
    onnx_simplify(model)
    simplified = ir.serde.serialize_model(model)
    onnx.shape_inference.infer_shapes(simplified, check_type=True, strict_mode=True)
    assert [n.op_type for n in simplified.graph.node] == ["Conv"]
    attributes = {a.name: helper.get_attribute_value(a) for a in simplified.graph.node[0].attribute}
    assert attributes.get("auto_pad") == b"SAME_UPPER" and "pads" not in attributes


def test_two_opset_9_clamps_stay_two_clamps():
    # Opset 6-10 Clip holds its bounds as attributes, which onnxscript's Clip fusion reads as
    # absent: clamp(-10, 10).clamp(-8, 8) became a Clip with no bounds at all.
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x"], ["c"], min=-10.0, max=10.0), helper.make_node("Clip", ["c"], ["y"], min=-8.0, max=8.0)],
        "g", [value("x", TensorProto.FLOAT, [2, 8])], [value("y", TensorProto.FLOAT, [2, 8])])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    model = ir.serde.deserialize_model(original)
    onnx_simplify(model)
    x = (np.random.default_rng(0).normal(size=(2, 8)) * 20).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (original, ir.serde.serialize_model(model))]
    assert np.abs(run[0]).max() == 8.0
    np.testing.assert_array_equal(run[0], run[1])


@pytest.mark.parametrize("opset", [9, 13])
def test_a_max_then_min_stays_as_written(opset):
    # Opset 6-10 Clip takes its bounds as attributes: the fusion's Clip-11 inputs failed there;
    # and its Clip drops the rank a bound of higher rank broadcasts to (tests/test_onnx_trust.py).
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    value = helper.make_tensor_value_info
    bounds = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", -1.0), ("hi", 2.0))]
    graph = helper.make_graph(
        [helper.make_node("Max", ["x", "lo"], ["m"]), helper.make_node("Min", ["m", "hi"], ["y"])],
        "g", [value("x", TensorProto.FLOAT, [2, 8])], [value("y", TensorProto.FLOAT, [2, 8])], bounds)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    model = ir.serde.deserialize_model(original)
    onnx_simplify(model)
    simplified = ir.serde.serialize_model(model)
    assert [n.op_type for n in simplified.graph.node] == ["Max", "Min"]
    x = (np.random.default_rng(0).normal(size=(2, 8)) * 5).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (original, simplified)]
    np.testing.assert_array_equal(run[0], run[1])
