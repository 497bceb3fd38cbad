"""Models as torchvision, timm and transformers ship them, against torch.func.jacrev in float64:
a representative case of each family of benchmarks/zoo.py (which runs them all). Each library's
cases skip where it is not installed (CI has torch alone); ``pip install -e .[test,zoo]`` runs
them.

A model that computes in float32 in places (RMSNorm, T5's norms, rotary embeddings upcast) is
checked as the census checks it: within 1e-6 of jacrev as shipped, and exact once the casts
are no-ops for both (verdict ``casts``).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "zoo", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py")

CASES = {
    "torchvision": ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
                    "resnet18[layer4.1.bn2.weight]"],
    "timm": ["mobilenetv3_small_100", "vit_tiny_patch16_224"],
    "transformers": ["bert", "bert[query.weight]", "gpt2", "distilbert", "roberta", "bart",
                     "vit", "clip-vision", "whisper-encoder", "wav2vec2", "llama",
                     "llama[gate_proj.weight]", "qwen2", "gemma", "mistral", "t5-encoder",
                     "t5", "mamba"],
}


@functools.cache
def _zoo():
    zoo = importlib.util.module_from_spec(_spec)
    sys.modules["zoo"] = zoo  # (its dataclass looks its module up there)
    _spec.loader.exec_module(zoo)
    return zoo


@pytest.mark.parametrize("lib, name", [(lib, n) for lib, ns in CASES.items() for n in ns])
def test_zoo_case(lib, name):
    pytest.importorskip(lib)
    zoo = _zoo()
    (case,) = [c for c in zoo.LIBS[lib]() if c.name == name]
    verdict, detail, _ = zoo.check(case, timeout=600)
    assert verdict == ("casts" if case.casts else "exact") or verdict == "exact", detail
