"""export/tensorrt/: what runs on CPU (operator coverage of the real exported graphs, profiles
vs config.pbtxt and the KV pool, the native config, the build-engine command, build progress,
docker image choice) and, without TensorRT, the build's message. The runtime side (the paged
step logic, TrtRuntime on a GPU) is tests/test_engine_runtime_trt.py."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from export.onnx import to_fp16, to_int8
from export.tensorrt import build, command, coverage, native
from serving import tensors
from serving.engine.gpu_libs import TensorRTUnavailableError
from serving.engine.kv_cache import KVPool
from serving.engine.profiles import AxisRange, check_profiles
from serving.repository import ServingOptions, parse_config, write_repository
from serving.server import DOCKER_IMAGE, TENSORRT_DOCKER_IMAGE, docker_image_for
from tests.trt_graphs import HAS_TENSORRT, TINY, graphs, model  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- operator coverage


def test_operator_list_is_the_pinned_release() -> None:
    ops = coverage.load_supported_ops()
    data = json.loads(coverage.OPS_FILE.read_text())
    assert ops.tensorrt_version == "10.6" == data["tensorrt_version"]
    assert ops.source["repository"] == "onnx/onnx-tensorrt" and len(ops.source["commit"]) == 40
    assert (ops.opset_min, ops.opset_max) == (9, 22)
    assert ops.operators["LayerNormalization"].supported  # since TensorRT 8.6
    assert not ops.operators["DynamicQuantizeLinear"].supported and not ops.operators["MatMulInteger"].supported
    assert "GroupQueryAttention" not in ops.operators
    # the Dockerfile and the runtime pin the same release
    from serving.engine.gpu_libs import TENSORRT_VERSION
    assert TENSORRT_VERSION == ops.tensorrt_version
    assert "tensorrt-cu12==10.6.0" in (ROOT / "docker" / "Dockerfile.tensorrt").read_text()


def test_dynamic_graph_is_supported_by_the_tensorrt_parser(graphs: dict[str, Path]) -> None:
    report = coverage.check_onnx_for_tensorrt(graphs["dynamic"])
    assert report.ok, report.problems
    assert {"LayerNormalization", "MatMul", "Concat", "Softmax"} <= set(report.op_counts)
    assert all("::" not in op for op in report.op_counts)  # default ONNX domain only
    assert report.unchecked_types == 0  # shape inference typed every checked operand


def test_fp16_dynamic_graph_is_supported(graphs: dict[str, Path]) -> None:
    proto = to_fp16(onnx.load(str(graphs["dynamic"])))
    report = coverage.check_onnx_for_tensorrt(proto)
    assert report.ok, report.problems
    types = {v.type.tensor_type.elem_type for v in proto.graph.input if v.name.startswith("past_key_values.")}
    assert types == {onnx.TensorProto.FLOAT16}


def test_static_graph_fails_naming_group_query_attention(graphs: dict[str, Path]) -> None:
    report = coverage.check_onnx_for_tensorrt(graphs["static"])
    assert not report.ok
    gqa = [p for p in report.problems if p.op_type == "com.microsoft::GroupQueryAttention"]
    # two per layer since mixed batches: the rows' group and the prompt chunk's group
    assert len(gqa) == 2 * TINY.n_layer and all(p.kind == "domain" for p in gqa)
    with pytest.raises(coverage.UnsupportedGraphError, match=r"com.microsoft::GroupQueryAttention.*kv_cache='dynamic'"):
        report.raise_if_problems()
    # build_engine refuses it on CPU, before TensorRT is imported
    with pytest.raises(coverage.UnsupportedGraphError, match="GroupQueryAttention"):
        build.build_engine(graphs["static"], graphs["static"].with_suffix(".plan"))


def test_int8_onnx_export_is_not_parseable(graphs: dict[str, Path]) -> None:
    proto = to_int8(onnx.load(str(graphs["dynamic"])))
    report = coverage.check_onnx_for_tensorrt(proto)
    bad = {p.op_type for p in report.problems if p.kind == "operator"}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= bad


def test_unsupported_dtype_and_restriction_are_reported() -> None:
    h = onnx.helper
    a = h.make_tensor_value_info("a", onnx.TensorProto.INT32, [2, 2])
    y = h.make_tensor_value_info("y", onnx.TensorProto.INT32, [2, 2])
    axes = h.make_tensor_value_info("axes", onnx.TensorProto.INT64, [1])
    graph = h.make_graph([h.make_node("MatMul", ["a", "a"], ["m"]),
                          h.make_node("Unsqueeze", ["m", "axes"], ["u"]),
                          h.make_node("Squeeze", ["u", "axes"], ["y"])], "g", [a, axes], [y])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    problems = coverage.check_onnx_for_tensorrt(proto).problems
    assert [(p.kind, p.op_type) for p in problems] == [("dtype", "MatMul"), ("restriction", "Unsqueeze"),
                                                       ("restriction", "Squeeze")]
    assert "INT32" in problems[0].message and "FP32, FP16, BF16" in problems[0].message
    proto.opset_import[0].version = 23
    assert any(p.kind == "opset" for p in coverage.check_onnx_for_tensorrt(proto).problems)


# ---------------------------------------------------------------------------- profiles


def test_default_profiles_agree_with_config_pbtxt_and_the_pool(graphs: dict[str, Path], tmp_path: Path) -> None:
    options = ServingOptions(max_sequences=8)
    profiles = command.profiles_from_flags(n_positions=TINY.n_positions, max_batch=options.max_sequences)
    repo = write_repository(tmp_path / "repo", engine_file=graphs["dynamic"], tokenizer_json="{}",
                            model_config=TINY.to_dict(), options=options)
    config = parse_config((repo / "gpt" / "config.pbtxt").read_text())
    pool = KVPool(n_layer=TINY.n_layer, n_head=TINY.n_head, head_dim=TINY.head_dim,
                  max_sequences=config.max_batch_size, max_length=TINY.n_positions)
    check_profiles(profiles, n_positions=TINY.n_positions, max_sequences=pool.max_sequences, max_length=pool.max_length)
    decode, prefill = profiles
    assert decode.batch.max == config.max_batch_size and decode.seq == AxisRange(1, 1, 1)
    assert decode.past.max + 1 == pool.max_length and prefill.seq.max == pool.max_length
    # every input of the graph gets a shape, with the graph's rank and fixed sizes
    graph = {v.name: v for v in onnx.load(str(graphs["dynamic"]), load_external_data=False).graph.input}
    shapes = decode.shapes(TINY.n_layer, TINY.n_head, TINY.head_dim)
    assert set(shapes) == set(graph)
    for name, (lo, opt, hi) in shapes.items():
        dims = graph[name].type.tensor_type.shape.dim
        assert len(lo) == len(opt) == len(hi) == len(dims)
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                assert lo[i] == opt[i] == hi[i] == d.dim_value, name

    # a repository with more slots than the engine's profiles take is refused, naming the fix
    with pytest.raises(ValueError, match=r"max_sequences=16 .*--max-batch 16"):
        check_profiles(profiles, n_positions=TINY.n_positions, max_sequences=16, max_length=TINY.n_positions)


def test_custom_profile_flags() -> None:
    (p,) = command.profiles_from_flags(n_positions=128, max_batch=4, max_shapes="batch=16,seq=64")
    assert p.batch == AxisRange(1, 4, 16) and p.seq == AxisRange(1, 1, 64) and p.past == AxisRange(0, 64, 127)
    with pytest.raises(ValueError, match="prompt of max_length=128"):
        check_profiles([p], n_positions=128, max_sequences=4, max_length=128)
    for bad, match in (("batch=1,tokens=2", "AXIS=N"), ("batch=x", "not an integer"), ("batch=1,batch=2", "twice")):
        with pytest.raises(ValueError, match=match):
            command.parse_shape_spec(bad, flag="--min-shapes")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        command.profiles_from_flags(n_positions=128, max_batch=4, min_shapes="batch=8")


# ---------------------------------------------------------------------------- loading, repositories, CLI


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_build_says_what_to_install(graphs: dict[str, Path], tmp_path: Path) -> None:
    # the CPU checks pass first, then the build needs TensorRT
    with pytest.raises(TensorRTUnavailableError, match="tensorrt-cu12==10.6.0"):
        build.build_engine(graphs["dynamic"], tmp_path / "out.plan", precision="fp16", progress=False)
    with pytest.raises(ValueError, match="explicitly quantized"):
        build.build_engine(graphs["dynamic"], tmp_path / "out.plan", precision="int8")


def test_native_tensorrt_plan_config_parses_and_follows_the_table() -> None:
    text = native.render_native_config(model_config=TINY.to_dict(), kv_dtype="float16",
                                           options=ServingOptions(max_sequences=4), engine_file="gpt.plan")
    config = parse_config(text)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert config.default_model_filename == "gpt.plan"
    assert [i.name for i in config.input] == [tensors.INPUT_IDS, tensors.POSITION_IDS, tensors.ATTENTION_MASK]
    assert [o.name for o in config.output] == [tensors.LOGITS] and list(config.output[0].dims) == [TINY.vocab_size]
    states = config.sequence_batching.state
    assert [(s.input_name, s.output_name) for s in states] == tensors.kv_pairs(TINY.n_layer)
    for s in states:
        assert list(s.dims) == [TINY.n_head, -1, TINY.head_dim] and s.data_type == parse_config(
            'input [{ name: "x" data_type: TYPE_FP16 dims: [1] }]').input[0].data_type
        assert list(s.initial_state[0].dims) == [TINY.n_head, 0, TINY.head_dim] and s.initial_state[0].zero_data


def test_build_engine_check_only_cli(graphs: dict[str, Path]) -> None:
    import typer

    app = typer.Typer()
    app.command()(command.build_engine_command)
    ok = CliRunner().invoke(app, [str(graphs["dynamic"]), "--check-only", "--max-batch", "4"])
    assert ok.exit_code == 0, ok.output
    assert "supported by TensorRT 10.6" in ok.output and "profile decode: batch 1/4/4" in ok.output
    bad = CliRunner().invoke(app, [str(graphs["static"]), "--check-only"])
    assert bad.exit_code == 1 and "GroupQueryAttention" in bad.output


def test_docker_image_follows_the_engine(tmp_path: Path) -> None:
    from serving.commands.serve import serve

    repo = tmp_path / "repo"
    for model in ("gpt", "generate", "tokenizer"):
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "config.pbtxt").write_text(f'name: "{model}"\n')
    (repo / "gpt" / "1" / "model.onnx").write_bytes(b"")
    assert docker_image_for(repo) == DOCKER_IMAGE
    (repo / "gpt" / "1" / "gpt.plan").write_bytes(b"")
    assert docker_image_for(repo) == TENSORRT_DOCKER_IMAGE

    import typer

    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, ["--repository", str(repo), "--docker", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert TENSORRT_DOCKER_IMAGE in result.output and f" {DOCKER_IMAGE} " not in result.output


def test_build_progress_tracks_nested_phases() -> None:
    from rich.progress import Progress

    with Progress(transient=True, disable=True) as bar:
        tracker = build.BuildProgress(bar)
        tracker.phase_start("Building engine", None, 3)
        tracker.phase_start("Tactic selection", "Building engine", 10)
        assert tracker.step_complete("Tactic selection", 4)
        assert bar.tasks[1].completed == 5 and bar.tasks[1].description == "  Tactic selection"
        tracker.phase_finish("Tactic selection")
        assert len(bar.tasks) == 1
        tracker.cancel()
        assert tracker.step_complete("Building engine", 0) is False  # tells TensorRT to stop


def test_tensorrt_dockerfile_pins_the_release_and_starts_like_the_server() -> None:
    from serving.server import CONTAINER_REPOSITORY, STARTUP_ARGS

    text = (ROOT / "docker" / "Dockerfile.tensorrt").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.11-py3" in text  # Triton 24.11 ships TensorRT 10.6
    assert "(major, minor) == (10, 6)" in text  # the build stops on any other base TensorRT
    cmd = json.loads(next(line for line in text.splitlines() if line.startswith("CMD "))[4:])
    assert cmd == ["tritonserver", f"--model-repository={CONTAINER_REPOSITORY}", *STARTUP_ARGS]
    assert (ROOT / "docker" / "Dockerfile.tensorrt.dockerignore").is_file()
