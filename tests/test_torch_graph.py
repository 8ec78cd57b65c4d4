"""onnxvq.finetune.torch_graph: the ONNX graph run in torch eager mode agrees with onnxruntime."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
import onnx_ir  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from models import cnn, mlp, run_ort  # noqa: E402
from onnxvq.errors import OnnxVQError  # noqa: E402
from onnxvq.finetune.torch_graph import (  # noqa: E402
    SUPPORTED_OPS,
    TorchGraph,
    UnsupportedOpsError,
    unsupported_ops,
)

R = np.random.default_rng(0)


def randn(*shape, dtype=np.float32):
    return R.standard_normal(shape).astype(dtype)


def i64(*values):
    return np.array(values, np.int64)


def f32(*values):
    return np.array(values, np.float32)


def run_torch(model, feeds, **kwargs):
    graph = TorchGraph(model, **kwargs)
    with torch.no_grad():
        outputs = graph({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
    return [o.numpy() for o in outputs]


def assert_matches_ort(model, feeds, *, atol=1e-5, rtol=1e-5):
    expected = run_ort(model, feeds)
    actual = run_torch(model, feeds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        assert a.shape == e.shape, (a.shape, e.shape)
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_cnn_matches_ort(opset):
    x = randn(2, 3, 16, 16)
    assert_matches_ort(cnn(opset), {"x": x})
    assert_matches_ort(cnn(opset, conv_weights_as_constants=True), {"x": x})


def test_mlp_matches_ort_and_accepts_onnx_ir_model():
    model = mlp()
    x = randn(5, 64)
    assert_matches_ort(model, {"x": x})
    ir_model = onnx_ir.serde.deserialize_model(model)
    expected = run_ort(model, {"x": x})[0]
    with torch.no_grad():
        (actual,) = TorchGraph(ir_model)({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-5, rtol=1e-5)


def test_digits_mlp_matches_ort():
    from digits_mlp import build_digits_mlp

    model, x_test, _ = build_digits_mlp(seed=0)
    assert_matches_ort(model, {"x": x_test[:64]})


def test_deit_tiny_matches_ort():
    from deit_tiny import build_deit_tiny

    assert_matches_ort(build_deit_tiny(), {"image": randn(1, 3, 224, 224)}, atol=1e-4, rtol=1e-4)


class _ExportedNet(torch.nn.Module):
    """Conv + BatchNorm + ReLU + MaxPool + AdaptiveAvgPool + Flatten + Linear, and a
    LayerNorm + GELU + softmax-attention block over the feature map's pixels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(2)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 16)
        self.embed = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        pooled = self.fc(torch.flatten(self.gap(y), 1))
        tokens = torch.nn.functional.gelu(self.ln(self.embed(y.flatten(2).transpose(1, 2))))
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        return self.out(attention.mean(1) + pooled)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # from torch.export internals
def test_dynamo_exported_model_matches_torch_and_ort_with_gradients():
    torch.manual_seed(0)
    net = _ExportedNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(net, (x,), dynamo=True, verbose=False)
    model = program.model_proto
    assert not unsupported_ops(model)
    feeds = {model.graph.input[0].name: x.numpy()}
    assert_matches_ort(model, feeds)

    # the exporter folds BatchNorm into the conv and pre-transposes MatMul weights; these keep their names
    trainable = {"fc.weight": net.fc.weight, "ln.weight": net.ln.weight, "qkv.bias": net.qkv.bias,
                 "out.weight": net.out.weight}
    assert set(trainable) <= {t.name for t in model.graph.initializer}
    graph = TorchGraph(model, trainable=trainable)
    (y,) = graph({model.graph.input[0].name: x})
    expected = net(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    expected.square().sum().backward()
    for name, parameter in trainable.items():
        torch.testing.assert_close(graph.initializer(name).grad, parameter.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# single-node checks


def node_model(op, inputs, *, opset=17, n_outputs=1, **attrs):
    """One `op` node whose inputs are graph inputs named i0, i1, ... (None: an omitted input)."""
    names = [f"i{k}" if value is not None else "" for k, value in enumerate(inputs)]
    outputs = [f"o{k}" for k in range(n_outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outputs, **attrs)],
        "node",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in zip(names, inputs)
            if value is not None
        ],
        [onnx.ValueInfoProto(name=name) for name in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    feeds = {name: value for name, value in zip(names, inputs) if value is not None}
    return model, feeds


def case(op, inputs, *, id, **kwargs):
    return pytest.param(op, inputs, kwargs, id=id)


IMAGE = randn(2, 4, 7, 9)
POSITIVE = R.uniform(0.1, 0.9, (3, 4)).astype(np.float32)
INT_VALUES = np.array([[7, -7, 5], [-5, 9, -9]], np.int64)
INT_DIVISORS = np.array([[2, 2, -3], [3, -4, 4]], np.int64)

NODE_CASES = [
    # Split
    case("Split", [randn(3, 6)], axis=1, split=[2, 4], n_outputs=2, opset=11, id="split-attr-11"),
    case("Split", [randn(3, 6), i64(1, 5)], axis=-1, n_outputs=2, opset=13, id="split-input-13"),
    case("Split", [randn(6, 2)], n_outputs=3, opset=13, id="split-equal-13"),
    case("Split", [randn(7, 2)], num_outputs=3, n_outputs=3, opset=18, id="split-num_outputs-18"),
    # Slice
    case("Slice", [randn(5, 6)], starts=[1, -4], ends=[100, -1], axes=[0, 1], opset=9, id="slice-attrs-9"),
    case("Slice", [randn(5, 6, 4), i64(-1, 10), i64(-100, 0), i64(0, 1), i64(-1, -2)], opset=13,
         id="slice-negative-steps"),
    case("Slice", [randn(5, 6), i64(4), i64(1), i64(-1), i64(-2)], opset=13, id="slice-negative-step-negative-axis"),
    case("Slice", [randn(5, 6), i64(1, 0), i64(2**62, 5), None, i64(2, 2)], opset=13, id="slice-int-max-steps"),
    case("Slice", [randn(5, 6), i64(3), i64(1)], opset=13, id="slice-empty"),
    # Resize / Upsample
    case("Upsample", [randn(1, 2, 3, 4)], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0], opset=7, id="upsample-7"),
    case("Resize", [randn(1, 2, 3, 4), f32(1, 1, 2, 3)], mode="nearest", opset=10, id="resize-10-nearest-up"),
    case("Resize", [randn(1, 2, 6, 9), f32(1, 1, 0.5, 0.34)], mode="nearest", opset=10, id="resize-10-nearest-down"),
    case("Resize", [randn(1, 2, 3, 4), f32(1, 1, 2, 2.5)], mode="linear", opset=10, id="resize-10-linear"),
    case("Resize", [randn(1, 2, 3, 4), None, f32(1, 1, 2, 3)], mode="nearest", opset=13, id="resize-nearest-half_pixel"),
    case("Resize", [randn(1, 2, 3, 4), None, f32(1, 1, 1.5, 2.5)], mode="nearest",
         nearest_mode="round_prefer_ceil", coordinate_transformation_mode="asymmetric", opset=13,
         id="resize-nearest-prefer-ceil"),
    case("Resize", [randn(1, 2, 5, 7), None, f32(1, 1, 0.6, 0.5)], mode="nearest", nearest_mode="floor",
         coordinate_transformation_mode="tf_half_pixel_for_nn", opset=13, id="resize-nearest-floor-down"),
    case("Resize", [randn(1, 2, 3, 4), None, f32(1, 1, 2, 2)], mode="linear", opset=13, id="resize-linear-half_pixel"),
    case("Resize", [randn(1, 2, 3, 4), None, None, i64(1, 2, 7, 5)], mode="linear",
         coordinate_transformation_mode="align_corners", opset=13, id="resize-linear-align_corners-sizes"),
    case("Resize", [randn(1, 2, 8, 6), None, f32(1, 1, 0.5, 0.5)], mode="linear",
         coordinate_transformation_mode="asymmetric", opset=13, id="resize-linear-asymmetric-down"),
    case("Resize", [randn(1, 2, 4, 1), None, None, i64(1, 2, 8, 1)], mode="linear",
         coordinate_transformation_mode="pytorch_half_pixel", opset=13, id="resize-linear-pytorch_half_pixel"),
    case("Resize", [randn(1, 2, 4, 5), None, f32(1, 1, 2, 1.5)], mode="cubic", opset=13, id="resize-cubic"),
    case("Resize", [randn(1, 2, 4, 5), None, f32(1, 1, 2, 0.6)], mode="cubic", exclude_outside=1,
         cubic_coeff_a=-0.5, opset=13, id="resize-cubic-exclude_outside"),
    case("Resize", [randn(1, 2, 4, 5), f32(0, 0, 0.2, 0.1, 1, 1, 0.8, 0.9), None, i64(1, 2, 6, 3)], mode="linear",
         coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=0.5, opset=13,
         id="resize-tf_crop_and_resize"),
    case("Resize", [randn(1, 2, 4, 5), None, None, i64(6, 7)], mode="linear", axes=[2, 3], opset=18,
         id="resize-18-axes-sizes"),
    case("Resize", [randn(1, 2, 4, 5), None, None, i64(8, 8)], mode="nearest", axes=[2, 3],
         keep_aspect_ratio_policy="not_larger", opset=18, id="resize-18-not_larger"),
    case("Resize", [randn(1, 2, 4, 5), None, None, i64(6, 6)], mode="linear",
         keep_aspect_ratio_policy="not_smaller", axes=[2, 3], opset=18, id="resize-18-not_smaller"),
    case("Resize", [randn(1, 2, 4, 5), None, f32(1, 1, 1.7, 2.2)], mode="linear",
         coordinate_transformation_mode="half_pixel_symmetric", opset=19, id="resize-19-half_pixel_symmetric"),
    # Pad
    case("Pad", [randn(2, 3, 4)], pads=[0, 1, 2, 0, 2, 1], value=1.5, opset=2, id="pad-attrs-2"),
    case("Pad", [randn(2, 3, 4), i64(0, 1, 2, 0, 2, 1), f32(-2.0)], opset=13, id="pad-constant-value"),
    case("Pad", [randn(2, 3, 4), i64(0, -1, 2, 0, 1, -2)], opset=13, id="pad-negative"),
    case("Pad", [randn(1, 2, 4, 5), i64(0, 0, 3, 2, 0, 0, 2, 4)], mode="reflect", opset=13, id="pad-reflect"),
    case("Pad", [randn(1, 2, 4, 5), i64(0, 0, 3, 2, 0, 0, 5, 4)], mode="edge", opset=13, id="pad-edge"),
    case("Pad", [randn(2, 4, 5), i64(2, -1, 1, 2), None, i64(-1, 1)], mode="reflect", opset=18, id="pad-axes-18"),
    case("Pad", [randn(2, 4, 5), i64(1, 2, 3, 4), f32(3.0), i64(0, 2)], opset=18, id="pad-axes-constant-18"),
    case("Pad", [randn(2, 4, 5), i64(0, 2, 6, 0, 3, 1)], mode="wrap", opset=19, id="pad-wrap-19"),
    # Gather family
    case("Gather", [randn(5, 4), np.array(3, np.int64)], id="gather-scalar"),
    case("Gather", [randn(3, 5, 2), np.array([[0, -1], [4, 2]], np.int64)], axis=1, id="gather-2d-negative"),
    case("Gather", [randn(3, 5, 2), np.array([1, -3], np.int32)], axis=-3, id="gather-int32"),
    case("GatherElements", [randn(3, 4), np.array([[0, 2], [1, -1], [3, 0]], np.int64)], axis=1, id="gather-elements"),
    case("GatherND", [randn(3, 4, 2), np.array([[0, 1], [2, -1]], np.int64)], id="gather-nd"),
    case("GatherND", [randn(2, 3, 4), np.array([[[1], [0]], [[2], [2]]], np.int64)], batch_dims=1, id="gather-nd-batch"),
    case("ScatterND", [randn(4, 3), np.array([[1], [3]], np.int64), randn(2, 3)], id="scatter-nd"),
    case("ScatterND", [randn(4, 3), np.array([[1, 2], [1, 2]], np.int64), f32(1, 2)], reduction="add", opset=16,
         id="scatter-nd-add"),
    case("ScatterElements", [randn(3, 4), np.array([[0, 3], [1, 2], [-1, 0]], np.int64), randn(3, 2)], axis=1,
         id="scatter-elements"),
    case("ScatterElements", [randn(3, 4), np.array([[0, 1], [0, 2]], np.int64), randn(2, 2)], axis=0,
         reduction="add", id="scatter-elements-add"),
    case("Where", [np.array([[True], [False]]), randn(2, 3), randn(3)], id="where-broadcast"),
    case("Expand", [randn(3, 1), i64(2, 1, 4)], id="expand-bidirectional"),
    case("Expand", [randn(2, 3), i64(3)], id="expand-smaller-shape"),
    case("Einsum", [randn(2, 3, 4), randn(2, 4, 5)], equation="bij, bjk -> bik", id="einsum-bmm"),
    case("Einsum", [randn(2, 3, 4)], equation="...ij->...ji", id="einsum-ellipsis"),
    case("Einsum", [randn(4), randn(4)], equation="i,i", id="einsum-dot"),
    # Clip
    case("Clip", [randn(3, 4)], min=-0.5, max=0.3, opset=6, id="clip-attrs-6"),
    case("Clip", [randn(3, 4), f32(-0.5)], opset=11, id="clip-min-only-11"),
    case("Clip", [randn(3, 4), None, f32(0.2)], opset=13, id="clip-max-only-13"),
    case("Clip", [randn(3, 4), f32(0.4), f32(-0.1)], opset=13, id="clip-min-above-max"),
    case("Clip", [randn(3, 4)], opset=13, id="clip-no-bounds"),
    case("Clip", [INT_VALUES, np.array(-6, np.int64), np.array(6, np.int64)], opset=13, id="clip-int"),
    # Conv / ConvTranspose
    case("Conv", [randn(2, 4, 11), randn(6, 2, 3), randn(6)], group=2, strides=[2], pads=[1, 2], id="conv1d-groups"),
    case("Conv", [IMAGE, randn(5, 4, 3, 2)], dilations=[2, 1], pads=[2, 0, 1, 1], strides=[1, 2], id="conv2d-asym"),
    case("Conv", [IMAGE, randn(4, 1, 3, 3), randn(4)], group=4, auto_pad="SAME_UPPER", strides=[2, 2],
         id="conv2d-depthwise-same_upper"),
    case("Conv", [IMAGE, randn(3, 4, 4, 2)], auto_pad="SAME_LOWER", strides=[2, 3], id="conv2d-same_lower"),
    case("Conv", [IMAGE, randn(3, 4, 3, 3)], auto_pad="VALID", strides=[2, 2], id="conv2d-valid"),
    case("Conv", [randn(1, 2, 4, 5, 6), randn(3, 2, 2, 3, 3), randn(3)], pads=[1, 0, 1, 0, 1, 1], id="conv3d"),
    case("ConvTranspose", [randn(1, 4, 3, 5), randn(4, 3, 3, 3), randn(3)], strides=[2, 2], pads=[1, 0, 0, 1],
         output_padding=[1, 1], id="convtranspose-pads"),
    case("ConvTranspose", [randn(1, 4, 3, 5), randn(4, 1, 3, 2)], group=2, strides=[2, 1], dilations=[1, 2],
         id="convtranspose-groups-dilations"),
    case("ConvTranspose", [randn(1, 2, 3, 4), randn(2, 3, 3, 3)], strides=[2, 2], output_shape=[6, 8],
         id="convtranspose-output_shape-odd-padding"),
    case("ConvTranspose", [randn(1, 2, 3, 4), randn(2, 3, 3, 3)], strides=[2, 2], output_shape=[8, 10],
         id="convtranspose-output_shape-longer"),
    case("ConvTranspose", [randn(1, 2, 3, 4), randn(2, 3, 3, 3)], strides=[2, 2], output_shape=[6, 10],
         auto_pad="SAME_UPPER", id="convtranspose-output_shape-same_upper"),
    case("ConvTranspose", [randn(1, 2, 3, 4), randn(2, 3, 4, 3)], strides=[2, 2], auto_pad="SAME_UPPER",
         id="convtranspose-same_upper"),
    case("ConvTranspose", [randn(1, 2, 3, 4), randn(2, 3, 4, 3)], strides=[2, 2], auto_pad="SAME_LOWER",
         id="convtranspose-same_lower"),
    case("ConvTranspose", [randn(1, 2, 5), randn(2, 3, 3)], strides=[3], pads=[2, 1], id="convtranspose-1d"),
    # pooling
    case("MaxPool", [IMAGE], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, id="maxpool-ceil"),
    case("MaxPool", [IMAGE], kernel_shape=[3, 2], pads=[1, 0, 2, 1], strides=[2, 2], id="maxpool-asym-pads"),
    case("MaxPool", [IMAGE], kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="maxpool-same_upper"),
    case("MaxPool", [IMAGE], kernel_shape=[3, 2], dilations=[2, 2], pads=[1, 0, 2, 1], id="maxpool-dilated"),
    case("MaxPool", [IMAGE], kernel_shape=[3, 2], dilations=[2, 2], ceil_mode=1, strides=[2, 2],
         id="maxpool-dilated-ceil"),
    case("MaxPool", [IMAGE], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], n_outputs=2,
         id="maxpool-indices"),
    case("MaxPool", [randn(2, 3, 10)], kernel_shape=[3], strides=[2], ceil_mode=1, pads=[1, 1], id="maxpool-1d"),
    case("AveragePool", [IMAGE], kernel_shape=[3, 3], strides=[2, 2], id="avgpool"),
    case("AveragePool", [IMAGE], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="avgpool-pads"),
    case("AveragePool", [IMAGE], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
         id="avgpool-count_include_pad"),
    case("AveragePool", [IMAGE], kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1,
         count_include_pad=1, id="avgpool-ceil-asym"),
    case("AveragePool", [IMAGE], kernel_shape=[2, 2], auto_pad="SAME_LOWER", strides=[2, 2], id="avgpool-same_lower"),
    case("AveragePool", [randn(2, 3, 10)], kernel_shape=[4], strides=[3], ceil_mode=1, id="avgpool-1d-ceil"),
    case("GlobalMaxPool", [IMAGE], id="global-maxpool"),
    case("GlobalAveragePool", [randn(2, 3, 4, 5, 2)], id="global-avgpool-3d"),
    # softmax family across opsets
    case("Softmax", [randn(2, 3, 4)], axis=1, opset=11, id="softmax-11-flatten"),
    case("Softmax", [randn(2, 3, 4)], axis=1, opset=13, id="softmax-13-axis"),
    case("LogSoftmax", [randn(2, 3, 4)], opset=11, id="logsoftmax-11-default"),
    case("LogSoftmax", [randn(2, 3, 4)], opset=13, id="logsoftmax-13-default"),
    case("Hardmax", [randn(2, 3, 4)], axis=-2, opset=13, id="hardmax"),
    # activations
    case("Gelu", [randn(3, 4)], opset=20, id="gelu"),
    case("Gelu", [randn(3, 4)], approximate="tanh", opset=20, id="gelu-tanh"),
    case("LeakyRelu", [randn(3, 4)], id="leakyrelu"),
    case("LeakyRelu", [randn(3, 4)], alpha=0.2, id="leakyrelu-alpha"),
    case("PRelu", [randn(2, 3, 4), randn(3, 1)], id="prelu"),
    case("Elu", [randn(3, 4)], alpha=0.5, id="elu"),
    case("Celu", [randn(3, 4)], alpha=2.0, id="celu"),
    case("Selu", [randn(3, 4)], id="selu"),
    case("Selu", [randn(3, 4)], alpha=2.0, gamma=0.5, id="selu-attrs"),
    case("ThresholdedRelu", [randn(3, 4)], alpha=0.3, id="thresholded-relu"),
    case("HardSigmoid", [randn(3, 4) * 4], id="hardsigmoid"),
    case("HardSigmoid", [randn(3, 4) * 4], alpha=0.3, beta=0.4, id="hardsigmoid-attrs"),
    case("HardSwish", [randn(3, 4) * 4], id="hardswish"),
    case("Softplus", [randn(3, 4) * 5], id="softplus"),
    case("Softsign", [randn(3, 4)], id="softsign"),
    case("Mish", [randn(3, 4)], opset=18, id="mish"),
    # normalization
    case("BatchNormalization", [IMAGE, randn(4), randn(4), randn(4), R.uniform(0.5, 2, 4).astype(np.float32)],
         epsilon=1e-3, id="batchnorm"),
    case("LayerNormalization", [randn(2, 3, 4), randn(3, 4), randn(4)], axis=1, n_outputs=3, id="layernorm-3-outputs"),
    case("LayerNormalization", [randn(2, 3, 4), randn(4)], id="layernorm-no-bias"),
    case("InstanceNormalization", [IMAGE, randn(4), randn(4)], epsilon=1e-3, id="instancenorm"),
    case("GroupNormalization", [IMAGE, randn(4), randn(4)], num_groups=2, opset=21, id="groupnorm-21"),
    case("GroupNormalization", [IMAGE, randn(2), randn(2)], num_groups=2, epsilon=1e-3, opset=18, id="groupnorm-18"),
    # shape and layout
    case("Reshape", [randn(2, 3, 4), i64(0, -1)], id="reshape-zero-minus-one"),
    case("Reshape", [randn(2, 0, 4), i64(0, 4)], allowzero=1, opset=14, id="reshape-allowzero"),
    case("Flatten", [randn(2, 3, 4)], axis=0, id="flatten-0"),
    case("Flatten", [randn(2, 3, 4)], axis=-1, id="flatten-negative"),
    case("Transpose", [randn(2, 3, 4)], id="transpose-default"),
    case("Transpose", [randn(2, 3, 4)], perm=[1, 2, 0], id="transpose-perm"),
    case("Squeeze", [randn(1, 3, 1, 4)], axes=[-2], opset=11, id="squeeze-attr-11"),
    case("Squeeze", [randn(1, 3, 1, 4), i64(0, 2)], opset=13, id="squeeze-input-13"),
    case("Squeeze", [randn(1, 3, 1, 4)], opset=13, id="squeeze-all"),
    case("Unsqueeze", [randn(3, 4)], axes=[0, -1], opset=11, id="unsqueeze-attr-11"),
    case("Unsqueeze", [randn(3, 4), i64(3, 1)], opset=13, id="unsqueeze-input-13"),
    case("Tile", [randn(2, 3), i64(2, 3)], id="tile"),
    case("Concat", [randn(2, 3), randn(2, 1)], axis=-1, id="concat"),
    case("Shape", [randn(2, 3, 4)], id="shape"),
    case("Shape", [randn(2, 3, 4)], start=1, end=-1, opset=15, id="shape-start-end"),
    case("Size", [randn(2, 3, 4)], id="size"),
    case("DepthToSpace", [randn(1, 8, 2, 3)], blocksize=2, id="depth-to-space-dcr"),
    case("DepthToSpace", [randn(1, 8, 2, 3)], blocksize=2, mode="CRD", id="depth-to-space-crd"),
    case("SpaceToDepth", [randn(1, 2, 4, 6)], blocksize=2, id="space-to-depth"),
    case("Trilu", [randn(2, 4, 5)], id="trilu-upper"),
    case("Trilu", [randn(4, 5), np.array(-1, np.int64)], upper=0, id="trilu-lower-k"),
    # reductions across opsets
    case("ReduceSum", [randn(2, 3, 4)], axes=[1], opset=11, id="reducesum-attr-11"),
    case("ReduceSum", [randn(2, 3, 4), i64(-1, 0)], keepdims=0, opset=13, id="reducesum-input-13"),
    case("ReduceSum", [randn(2, 3, 4)], opset=13, id="reducesum-all"),
    case("ReduceSum", [randn(2, 3, 4), np.zeros(0, np.int64)], noop_with_empty_axes=1, opset=13, id="reducesum-noop"),
    case("ReduceSum", [INT_VALUES.astype(np.int32), i64(1)], opset=13, id="reducesum-int32"),
    case("ReduceMean", [randn(2, 3, 4)], axes=[1, 2], opset=13, id="reducemean-attr-13"),
    case("ReduceMean", [randn(2, 3, 4), i64(1)], opset=18, id="reducemean-input-18"),
    case("ReduceMax", [randn(2, 3, 4)], axes=[0], keepdims=0, opset=13, id="reducemax-13"),
    case("ReduceMin", [randn(2, 3, 4), i64(2)], opset=18, id="reducemin-18"),
    case("ReduceProd", [randn(2, 3, 4), i64(0, 2)], keepdims=0, opset=18, id="reduceprod"),
    case("ReduceL1", [randn(2, 3, 4), i64(1)], opset=18, id="reducel1"),
    case("ReduceL2", [randn(2, 3, 4), i64(1)], opset=18, id="reducel2"),
    case("ReduceSumSquare", [randn(2, 3, 4)], axes=[2], opset=13, id="reducesumsquare"),
    case("ReduceLogSum", [POSITIVE], axes=[1], opset=13, id="reducelogsum"),
    case("ReduceLogSumExp", [randn(2, 3, 4), i64(1)], opset=18, id="reducelogsumexp"),
    case("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], axis=1, id="argmax-first"),
    case("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], axis=1, keepdims=0, select_last_index=1,
         id="argmax-last"),
    case("ArgMin", [randn(3, 4)], id="argmin"),
    # indexing and generators
    case("CumSum", [randn(3, 4), np.array(1, np.int64)], id="cumsum"),
    case("CumSum", [randn(3, 4), np.array(-2, np.int64)], exclusive=1, reverse=1, id="cumsum-exclusive-reverse"),
    case("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], id="range-int"),
    case("Range", [np.array(0.5, np.float32), np.array(-2, np.float32), np.array(-0.75, np.float32)],
         id="range-float"),
    case("TopK", [randn(3, 6), i64(2)], axis=1, n_outputs=2, id="topk"),
    case("TopK", [randn(3, 6), i64(3)], axis=0, largest=0, n_outputs=2, id="topk-smallest"),
    case("NonZero", [np.array([[1, 0, 2], [0, 3, 0]], np.float32)], id="nonzero"),
    case("OneHot", [np.array([[0, 2], [-1, 5]], np.int64), np.array(3, np.int64), f32(-1, 1)], axis=1, id="onehot"),
    case("ConstantOfShape", [i64(2, 3)], id="constant-of-shape-default"),
    case("ConstantOfShape", [i64(2, 3)], value=helper.make_tensor("v", TensorProto.INT64, [1], [7]),
         id="constant-of-shape-int"),
    # constants and types
    case("Constant", [], value_ints=[3, -1], id="constant-value_ints"),
    case("Constant", [], value_int=4, id="constant-value_int"),
    case("Constant", [], value_floats=[0.5, 2.0], id="constant-value_floats"),
    case("Constant", [], value=numpy_helper.from_array(randn(2, 3)), id="constant-value"),
    case("Cast", [np.array([1.7, -1.7, 0.0, 2.5], np.float32)], to=TensorProto.INT64, id="cast-float-int"),
    case("Cast", [np.array([1.7, 0.0], np.float32)], to=TensorProto.BOOL, id="cast-float-bool"),
    case("Cast", [randn(2, 3)], to=TensorProto.FLOAT16, id="cast-float16"),
    case("Cast", [INT_VALUES], to=TensorProto.DOUBLE, id="cast-double"),
    case("Cast", [INT_VALUES], to=TensorProto.INT8, id="cast-int8"),
    case("Cast", [np.array([0, 200], np.uint8)], to=TensorProto.INT32, id="cast-uint8"),
    case("CastLike", [INT_VALUES, f32(1)], id="castlike"),
    case("Dropout", [randn(3, 4), np.array(0.5, np.float32)], opset=13, n_outputs=2, id="dropout"),
    case("Identity", [randn(3, 4)], id="identity"),
    # arithmetic and logic
    case("Div", [INT_VALUES, INT_DIVISORS], id="div-int-truncates"),
    case("Div", [randn(2, 3), randn(3)], id="div-float"),
    case("Mod", [INT_VALUES, INT_DIVISORS], id="mod-int"),
    case("Mod", [randn(2, 3), f32(0.7, -0.7, 0.3)], fmod=1, id="mod-fmod"),
    case("Pow", [POSITIVE, randn(4)], id="pow"),
    case("Pow", [POSITIVE, np.array(2, np.int64)], id="pow-int-exponent"),
    case("Max", [randn(2, 3), randn(3), randn(1, 1)], id="max-variadic"),
    case("Min", [randn(2, 3), randn(3)], id="min"),
    case("Sum", [randn(2, 3), randn(3), randn(2, 1)], id="sum-variadic"),
    case("Mean", [randn(2, 3), randn(3)], id="mean"),
    case("Equal", [INT_VALUES, np.array([7, 9, -9], np.int64)], id="equal"),
    case("LessOrEqual", [randn(2, 3), randn(3)], id="less-or-equal"),
    case("GreaterOrEqual", [randn(2, 3), randn(3)], id="greater-or-equal"),
    case("Xor", [np.array([True, False, True]), np.array([True, True, False])], id="xor"),
    case("IsInf", [f32(1, np.inf, -np.inf, np.nan)], detect_negative=0, id="isinf"),
    case("IsNaN", [f32(1, np.inf, np.nan)], id="isnan"),
    case("Round", [f32(0.5, 1.5, 2.5, -0.5, -1.4)], id="round-half-even"),
    case("Sign", [f32(-2, 0, 3)], id="sign"),
]

UNARY = ["Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Floor", "Ceil", "Sin", "Cos", "Tan",
         "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Atanh", "Tanh", "Sigmoid", "Relu", "Not"]


@pytest.mark.parametrize("op, inputs, kwargs", NODE_CASES)
def test_node_matches_ort(op, inputs, kwargs):
    model, feeds = node_model(op, inputs, **kwargs)
    assert_matches_ort(model, feeds)


@pytest.mark.parametrize("op", UNARY + ["Acosh"])
def test_unary_matches_ort(op):
    x = np.array([True, False]) if op == "Not" else POSITIVE + (1.0 if op == "Acosh" else 0.0)
    model, feeds = node_model(op, [x])
    assert_matches_ort(model, feeds)


def test_comparisons_and_logic_match_ort():
    a, b = randn(2, 3), randn(3)
    for op in ("Less", "Greater", "Add", "Sub", "Mul"):
        assert_matches_ort(*node_model(op, [a, b]))
    p, q = np.array([True, False, True]), np.array([True, True, False])
    for op in ("And", "Or"):
        assert_matches_ort(*node_model(op, [p, q]))


def test_every_registered_op_has_a_check():
    checked = {param.values[0] for param in NODE_CASES} | set(UNARY) | {"Acosh", "Less", "Greater", "Add", "Sub",
                                                                          "Mul", "And", "Or"}
    checked |= {"Constant", "Conv", "Gemm", "MatMul", "Relu", "GlobalAveragePool", "Flatten"}  # the cnn
    checked |= {"LSTM", "GRU", "RNN"}  # tests/test_torch_recurrent.py
    assert SUPPORTED_OPS - checked == set()


def test_float16_initializers_stay_float16():
    w = randn(4, 3).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert TorchGraph(model).initializer("w").dtype == torch.float16
    assert_matches_ort(model, {"x": randn(2, 4).astype(np.float16)}, atol=1e-2, rtol=1e-2)


def test_dynamic_shapes_and_train_mode_keep_inference_semantics():
    """A Shape -> Gather -> Concat -> Reshape chain with the batch size changing between calls, and
    Dropout + BatchNormalization that stay in inference form under module.train()."""
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Dropout", ["bn", "ratio", "training"], ["drop"]),
        helper.make_node("Shape", ["drop"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["drop", "new_shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in {
        "s": randn(3), "b": randn(3), "m": randn(3), "v": R.uniform(0.5, 2, 3).astype(np.float32),
        "ratio": f32(0.5)[0], "training": np.array(True), "zero": i64(0), "minus_one": i64(-1)}.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    module = TorchGraph(model).train()
    for batch in (1, 5):
        x = randn(batch, 3, 4, 4)
        (y,) = module({"x": torch.from_numpy(x)})
        training_false = onnx.ModelProto()
        training_false.CopyFrom(model)
        for tensor in training_false.graph.initializer:
            if tensor.name == "training":
                tensor.CopyFrom(numpy_helper.from_array(np.array(False), "training"))
        np.testing.assert_allclose(y.detach().numpy(), run_ort(training_false, {"x": x})[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# gradients, overrides, parameters


def test_overrides_and_trainable_initializers_get_gradients():
    model = cnn()
    before = model.SerializeToString()
    graph = TorchGraph(model, trainable={"w3", "b4"})
    assert model.SerializeToString() == before
    assert {name for name, _ in graph.named_parameters()} == {"w3", "b4"}
    assert graph.initializer("w3") is dict(graph.named_parameters())["w3"]
    assert not graph.initializer("w1").requires_grad and not graph.initializer("w4").requires_grad

    w1 = graph.initializer("w1")
    source = torch.nn.Parameter(w1.detach().clone() / 2)
    x = torch.from_numpy(randn(2, 3, 16, 16))
    (y,) = graph({"x": x}, overrides={"w1": source * 2})
    np.testing.assert_allclose(y.detach().numpy(), run_ort(model, {"x": x.numpy()})[0], atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0
    assert graph.initializer("w3").grad is not None and graph.initializer("b4").grad is not None
    assert graph.initializer("w1").grad is None and graph.initializer("w2").grad is None
    assert graph.initializer("w4").grad is None

    (changed,) = graph({"x": x}, overrides={"w1": torch.zeros_like(w1)})
    assert not torch.allclose(changed, y)
    with pytest.raises(KeyError, match="not_a_weight"):
        graph({"x": x}, overrides={"not_a_weight": w1})
    with pytest.raises(KeyError, match="x"):
        graph({}, overrides={})


def test_constant_node_overrides_get_gradients():
    model = cnn(conv_weights_as_constants=True)
    graph = TorchGraph(model)
    assert list(graph.parameters()) == []
    w2 = graph.initializer("w2")
    source = torch.nn.Parameter(w2.detach().clone())
    x = torch.from_numpy(randn(2, 3, 16, 16))
    (y,) = graph({"x": x}, overrides={"w2": source})
    np.testing.assert_allclose(y.detach().numpy(), run_ort(model, {"x": x.numpy()})[0], atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0
    (zeroed,) = graph({"x": x}, overrides={"w2": torch.zeros_like(w2)})
    assert not torch.allclose(zeroed, y)


def test_parameter_names_are_sanitized_and_unique():
    # initializer names with dots and slashes, and two that sanitize to the same name
    w = numpy_helper.from_array(randn(3, 4), "fc1.weight")
    w2 = numpy_helper.from_array(randn(4, 2), "fc1/weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]), helper.make_node("MatMul", ["h", "fc1/weight"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    module = TorchGraph(model, trainable=["fc1.weight", "fc1/weight"])
    names = dict(module.named_parameters())
    assert len(names) == 2 and all("." not in n and "/" not in n for n in names)
    assert {id(p) for p in names.values()} == {id(module.initializer("fc1.weight")), id(module.initializer("fc1/weight"))}
    x = torch.from_numpy(randn(2, 3))
    module({"x": x})[0].sum().backward()
    assert all(p.grad is not None for p in names.values())
    with pytest.raises(KeyError, match="nope"):
        TorchGraph(model, trainable=["nope"])


# ---------------------------------------------------------------------------------------------------
# unsupported ops and local functions


def test_unsupported_ops_lists_control_flow_and_other_ops():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4])])
    nodes = [
        helper.make_node("DFT", ["x"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"]),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
    ]
    inits = [numpy_helper.from_array(randn(1, 16, 3), "W"), numpy_helper.from_array(randn(1, 16, 4), "R"),
             numpy_helper.from_array(f32(0)[0], "zero")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert unsupported_ops(model) == ["DFT", "If"]
    assert unsupported_ops(onnx_ir.serde.deserialize_model(model)) == ["DFT", "If"]
    with pytest.raises(UnsupportedOpsError, match="DFT, If") as raised:
        TorchGraph(model)
    assert raised.value.op_types == ["DFT", "If"]
    assert isinstance(raised.value, OnnxVQError)

    fused = helper.make_node("FusedConv", ["x", "W"], ["z"], domain="com.microsoft")
    model.graph.node.append(fused)
    assert unsupported_ops(model) == ["DFT", "If", "com.microsoft::FusedConv"]
    assert not {"If", "Loop", "Scan"} & SUPPORTED_OPS
    assert {"LSTM", "GRU", "RNN"} <= SUPPORTED_OPS


def _function_model(body_op="Sigmoid"):
    """y = Scaled(QuickGelu(x)) with custom-domain local functions; QuickGelu(x) = x * op(1.702 x)
    and Scaled calls QuickGelu again (a nested call)."""
    quick_gelu = helper.make_function(
        "custom", "QuickGelu", ["x"], ["y"],
        [
            helper.make_node("Constant", [], ["k"], value_float=1.702),
            helper.make_node("Mul", ["x", "k"], ["kx"]),
            helper.make_node(body_op, ["kx"], ["s"]),
            helper.make_node("Mul", ["x", "s"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    scaled = helper.make_function(
        "custom", "Scaled", ["x", "w"], ["y"],
        [helper.make_node("QuickGelu", ["x"], ["g"], domain="custom"), helper.make_node("MatMul", ["g", "w"], ["y"])],
        [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
    )
    graph = helper.make_graph(
        [helper.make_node("QuickGelu", ["x"], ["h"], domain="custom"),
         helper.make_node("Scaled", ["h", "w"], ["y"], domain="custom")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(randn(4, 3), "w")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
        functions=[quick_gelu, scaled], ir_version=10,
    )


def test_model_local_functions_are_inlined_and_run():
    model = _function_model()
    before = model.SerializeToString()
    assert unsupported_ops(model) == []
    assert_matches_ort(model, {"x": randn(2, 4)})
    assert model.SerializeToString() == before
    module = TorchGraph(onnx_ir.serde.deserialize_model(model), trainable={"w"})
    module({"x": torch.from_numpy(randn(2, 4))})[0].sum().backward()
    assert module.initializer("w").grad is not None

    assert unsupported_ops(_function_model("DFT")) == ["DFT"]
    assert unsupported_ops(onnx_ir.serde.deserialize_model(_function_model("DFT"))) == ["DFT"]
    with pytest.raises(UnsupportedOpsError, match="DFT"):
        TorchGraph(_function_model("DFT"))
