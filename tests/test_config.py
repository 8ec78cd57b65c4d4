"""Config resolution: precedence and errors."""

import json

import pytest

from onnxvq.config import CompressConfig, resolve_layers
from onnxvq.errors import OnnxVQError

LAYERS = [
    ("conv1", "Conv", 864),
    ("conv2", "Conv", 18432),
    ("block.fc1", "Gemm", 65536),
    ("block.fc2", "MatMul", 65536),
    ("head", "Gemm", 5120),
]


def plans(**config):
    return {p.name: p for p in resolve_layers(CompressConfig.from_dict(config), LAYERS)}


def test_defaults_and_min_size():
    p = plans(k=64, d=4)
    assert not p["conv1"].compressed and p["conv1"].rule == "min_size 1024"
    assert p["conv2"].compressed and p["conv2"].params.k == 64 and p["conv2"].params.d == 4
    assert p["conv2"].rule == "default"


def test_precedence_exact_over_regex_over_op_type_over_min_size():
    p = plans(
        d=8,
        layers={
            "Gemm": {"k": 32},
            "re:block\\..*": {"k": 128},
            "block.fc1": {"k": 16},
            "Conv": {"d": 9},
        },
    )
    assert p["block.fc1"].params.k == 16  # exact name beats the pattern
    assert p["block.fc2"].params.k == 128  # pattern beats op type
    assert p["head"].params.k == 32  # op type
    assert p["conv1"].compressed and p["conv1"].params.d == 9  # an explicit rule beats min_size
    assert p["conv2"].params.d == 9 and p["conv2"].params.k == 256  # omitted keys come from global


def test_first_matching_pattern_wins_and_fullmatch():
    p = plans(layers={"re:block.*": {"k": 8}, "re:.*fc2": {"k": 4}, "re:.*": {"k": 3}})
    assert p["block.fc2"].params.k == 8
    assert p["head"].params.k == 3
    with pytest.raises(OnnxVQError, match="'re:fc' matches no layer"):  # fullmatch, not search
        plans(layers={"re:fc": {"k": 2}})


def test_skip_wins_over_everything():
    p = plans(skip=["block.fc1", "re:conv.*"], layers={"block.fc1": {"k": 4}})
    assert not p["block.fc1"].compressed and "skip" in p["block.fc1"].rule
    assert not p["conv2"].compressed
    assert p["block.fc2"].compressed


def test_override_skip_true():
    p = plans(layers={"head": {"skip": True}})
    assert not p["head"].compressed and p["head"].rule == "layers['head']"


@pytest.mark.parametrize(
    "config,message",
    [
        ({"layers": {"nope": {"k": 4}}}, "config key 'nope' matches no layer; run `onnxvq inspect"),
        ({"layers": {"re:xyz.*": {}}}, "matches no layer"),
        ({"layers": {"ConvTranspose": {}}}, "matches no layer"),
        ({"skip": ["ghost"]}, "skip entry 'ghost' matches no layer"),
    ],
)
def test_keys_matching_nothing_are_errors(config, message):
    with pytest.raises(OnnxVQError, match=message.replace("(", r"\(").replace("`", "`")):
        resolve_layers(CompressConfig.from_dict(config), LAYERS)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"k": 1}, "k must be at least 2"),
        ({"d": 0}, "d must be at least 1"),
        ({"k": 70000}, "k must be at most 65536"),
        ({"method": "nope"}, "unknown method 'nope'; available: lr2vq, pq, ssvq"),
        ({"colour": "blue"}, "unknown config key"),
        ({"layers": {"conv2": {"kk": 3}}}, "unknown setting"),
        ({"layers": {"conv2": {"k": 1}}}, "k must be at least 2"),
        ({"layers": {"re:(": {}}}, "invalid regular expression"),
        ({"codebook_dtype": "int8"}, "codebook_dtype must be one of"),
        ({"min_size": -1}, "min_size must be a non-negative integer"),
        ({"layers": {"conv2": {"skip": "yes"}}}, "skip must be true or false"),
        ({"skip": "conv1"}, "skip must be a list"),
    ],
)
def test_invalid_settings(config, message):
    with pytest.raises(OnnxVQError, match=message):
        CompressConfig.from_dict(config)


def test_from_file_json_and_yaml(tmp_path):
    data = {"method": "pq", "k": 64, "d": 4, "layers": {"conv2": {"k": 16}}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("method: pq\nk: 64\nd: 4\nlayers:\n  conv2: {k: 16}\n")
    assert CompressConfig.from_file(tmp_path / "c.json") == CompressConfig.from_file(tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("k: [1,\n")
    with pytest.raises(OnnxVQError, match="not valid JSON/YAML"):
        CompressConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(OnnxVQError, match="cannot read the config"):
        CompressConfig.from_file(tmp_path / "missing.yaml")


def test_cli_flags_merge_over_file_settings():
    base = CompressConfig.from_dict({"k": 64, "skip": ["conv1"]})
    merged = base.merged(k=None, d=4, skip=["head"])
    assert merged.k == 64 and merged.d == 4 and merged.skip == ["conv1", "head"]


def test_method_options_reach_params():
    p = plans(max_iter=7)
    assert p["conv2"].params.max_iter == 7
