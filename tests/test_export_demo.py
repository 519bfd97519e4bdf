"""`export-model` on the demo model at each precision (issue: export-model, "each precision on
`tiny` and on the demo model"; `tiny` is in test_onnx_export.py).

The default suite exports the demo preset's shape with the demo tokenizer (vocab 4096), trained
on a small budget into a temporary cache: a trained model, so fp16 and int8 are held to the
greedy-agreement and perplexity thresholds that random weights cannot test. The real demo
recipe takes ~3 minutes to train, so the check of `export-model --model demo` itself (the
issue's done-when) is marked `slow`: run it with `.venv/bin/pytest -m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from export import demo
from export.cli import app
from export.model import generate_greedy
from export.onnx import TOLERANCES
from serving.bench.ort_loop import OrtLoop
from serving.repository import validate_repository, verify_manifest
from serving.server import has_nvidia_gpu

runner = CliRunner()
PRECISIONS = ("fp32", "fp16", "int8")
# demo shape and tokenizer; ~25 s of training takes it well past the unigram plateau
SMALL = dict(steps=150, batch_size=4, lr=3e-3, progress=False)
PROMPT = "The return statement"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoResult:
    result = demo.train_demo(cache_dir=tmp_path_factory.mktemp("demo-cache"), **SMALL)
    assert result.heldout_loss < result.unigram_loss - 0.3, "the small budget did not train the model"
    return result


def export(source: str, precision: str, out: Path, *extra: str) -> str:
    result = runner.invoke(app, ["--model", source, "--precision", precision, "--output", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def check_repository(repo: Path, precision: str) -> dict:
    """The repository is complete and its recorded validation is within the stated tolerance."""
    validate_repository(repo)
    assert verify_manifest(repo) == []
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["precision"] == precision
    v, tol = manifest["validation"], TOLERANCES[precision]
    assert v["precision"] == precision
    names = {c["name"] for c in v["checks"]}
    assert {"prefill+decode", "empty past", "batched lengths"} <= {n.split(" (")[0] for n in names}, names
    overall, ppl = v["overall"], v["perplexity"]
    assert ppl is not None and ppl["tokens"] > 100  # the held-out demo text was scored
    if tol.max_abs_logits is not None:
        assert overall["max_abs_logits"] <= tol.max_abs_logits
    if tol.max_rel_logits is not None:
        assert overall["rel_logits"] <= tol.max_rel_logits
    if tol.min_agreement is not None:
        assert overall["decisive"] > 0 and overall["agreement"] >= tol.min_agreement
    assert ppl["rel_change"] <= tol.max_rel_ppl
    return manifest


@pytest.mark.parametrize("precision", PRECISIONS)
def test_demo_shape_exports_and_validates(trained: demo.DemoResult, precision: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    output = export(str(trained.folder), precision, repo)
    assert "max |Δlogits|" in output
    manifest = check_repository(repo, precision)
    assert manifest["model_config"]["vocab_size"] == trained.tokenizer.vocab_size == 4096
    # the served graph's greedy continuation of the README prompt, against PyTorch's
    prompt = trained.tokenizer.encode(PROMPT)
    expected = generate_greedy(trained.model, prompt, 24)
    got = list(OrtLoop(repo / "gpt" / "1" / "model.onnx", threads=2).generate(prompt, 24).tokens)
    if precision == "fp32":
        assert got == expected
    else:  # reduced precision may flip a near-tie, after which the texts differ: compare the first tokens
        assert got[:4] == expected[:4], (got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ("fp16", "int8"))
def test_export_model_demo(precision: str, tmp_path: Path) -> None:
    """The issue's done-when, as written: `export-model --model demo --precision fp16|int8` (the
    real recipe; trained once, then read from the cache)."""
    repo = tmp_path / "repo"
    output = export("demo", precision, repo)
    if precision == "fp16" and not has_nvidia_gpu():
        assert "no GPU here" in output  # the one-line hint about the fast CPU choice
    manifest = check_repository(repo, precision)
    assert manifest["model_config"]["n_layer"] == 4 and np.isfinite(manifest["validation"]["perplexity"]["ppl_onnx"])
