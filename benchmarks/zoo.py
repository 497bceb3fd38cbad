"""Models as the ecosystem ships them, against torch.func.jacrev in float64.

Every torchvision classification model, a few timm families and tiny transformers models
(built from config objects, no downloads), each by its own constructor with random weights,
in float64, eval mode and at a small input; differentiated w.r.t. the input (pixels, audio, or
``inputs_embeds``) and, for a few, w.r.t. one weight tensor through
``torch.func.functional_call``. Each case's verdict is one of

- ``exact``: sparsejac's Jacobian is jacrev's (rtol 1e-9, atol 1e-11 times the largest entry);
- ``casts``: it differs only because the model computes in float32 in places (RMSNorm and T5's
  norms upcast ``.to(torch.float32)``, rotary embeddings ``.float()``): by at most 1e-6 of the
  largest entry, and run again with those casts made no-ops, for both sparsejac and jacrev, it
  is exact;
- ``wrong``: it differs otherwise (the worst defect);
- ``refused-op``: the package refused an operation (its message is kept);
- ``refused-memory``: the memory guard refused it (``memory_limit="4GB"``);
- ``crash``: any other exception (also where jacrev itself fails: then ``skip``).

    python benchmarks/zoo.py [--lib torchvision timm transformers] [--only NAME ...]
                             [--markdown zoo.md]

Needs torchvision, timm and transformers (the ``zoo`` extra of pyproject.toml).
"""

from __future__ import annotations

import argparse
import collections
import gc
import pathlib
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

import sparsejac
from sparsejac.errors import JacobianTooLargeError, SparsejacError

D = torch.float64
LIMIT = "4GB"
RTOL, ATOL = 1e-9, 1e-11
SIZES = (16, 32, 64, 75, 96, 128, 224, 299)  # image sides tried, smallest first
CASTS = 1e-6  # the most the float32 casts may move an entry (relative to the largest)
ORDER = ("wrong", "crash", "refused-op", "refused-memory", "timeout", "casts", "exact", "skip")


@dataclass
class Case:
    lib: str
    name: str
    build: Callable[[], tuple]  # -> (fn, args, wrt)
    casts: bool = False  # the model computes in float32 in places
    # where the memory guard refuses the case: the model w.r.t. its first vector parameter
    # (few columns, so every operation is still checked: the name says which)
    fallback: Callable[[], tuple] | None = None


def _rand(*shape, seed=1):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _model(make, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (the parameters need no gradient of their own: sdpa's CPU kernel cannot
        # differentiate a mask that requires one, as T5's position bias would)
        return make().to(D).eval().requires_grad_(False)


def _side(model, channels=3, sizes=SIZES):
    """The smallest image side (of ``sizes``) the model runs at."""
    for s in sizes:
        try:
            with torch.no_grad():
                model(torch.zeros(1, channels, s, s, dtype=D))
            return s
        except Exception:  # noqa: BLE001 (too small for the model: try the next)
            continue
    raise RuntimeError("no input side of %s runs" % (sizes,))


def _wrt_weight(model, pname, x, out=lambda y: y):
    """``fn(w)`` of the model with parameter ``pname`` replaced by ``w``, and ``w``."""
    named = dict(model.named_parameters())
    if pname == "first":  # the first vector (a bias or a norm's weight): few columns
        pname = next(n for n, p in named.items() if p.dim() == 1)
    params = {pname: named[pname].detach().clone()}

    def fn(p):
        return out(torch.func.functional_call(model, p, (x,)))

    return fn, (params,)


def _pixels(make, sizes=SIZES, weight=None, out=lambda y: y):
    def build():
        model = _model(make)
        s = _side(model, sizes=sizes)
        x = _rand(1, 3, s, s)
        if weight is not None:
            return _wrt_weight(model, weight, x, out)
        return (lambda x: out(model(x))), (x,)

    return build


# --- torchvision ----------------------------------------------------------------------------


def torchvision_cases():
    import torchvision

    cases = []
    for name in torchvision.models.list_models(module=torchvision.models):
        kwargs: dict = {"weights": None, "num_classes": 10}
        sizes = SIZES
        if name.startswith("vit_"):
            kwargs["image_size"] = 28 if name.endswith("14") else 32  # two by two patches
            sizes = (kwargs["image_size"],)
        if name == "maxvit_t":
            kwargs["input_size"] = (224, 224)
            sizes = (224,)
        make = (lambda name=name, kwargs=kwargs: torchvision.models.get_model(name, **kwargs))
        cases.append(Case("torchvision", name, _pixels(make, sizes),
                          fallback=_pixels(make, sizes, weight="first")))
    make18 = lambda: torchvision.models.resnet18(weights=None, num_classes=10)  # noqa: E731
    cases.append(Case("torchvision", "resnet18[layer4.1.bn2.weight]",
                      _pixels(make18, weight="layer4.1.bn2.weight")))
    return cases


# --- timm -----------------------------------------------------------------------------------

TIMM = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
        "convnextv2_atto", "vit_tiny_patch16_224", "resmlp_12_224", "regnetx_002",
        "densenet121")


def timm_cases():
    import timm

    cases = []
    for name in TIMM:
        kwargs: dict = {"pretrained": False, "num_classes": 10}
        sizes = SIZES
        if name.startswith(("vit_", "resmlp_")):
            kwargs["img_size"] = 32
            sizes = (32,)
        make = (lambda name=name, kwargs=kwargs: timm.create_model(name, **kwargs))
        cases.append(Case("timm", name, _pixels(make, sizes),
                          fallback=_pixels(make, sizes, weight="first")))
    makec = lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10)  # noqa
    cases.append(Case("timm", "convnext_atto[stages.3.blocks.1.conv_dw.weight]",
                      _pixels(makec, weight="stages.3.blocks.1.conv_dw.weight")))
    return cases


# --- transformers ---------------------------------------------------------------------------

H = 32  # hidden size of every tiny config


def _embeds(make, n=4, out=lambda o: o.last_hidden_state, extra=None, weight=None):
    """A token model w.r.t. ``inputs_embeds`` (1, n, H) (or one of its weights)."""

    def build():
        model = _model(make)
        x = _rand(1, n, H)
        more = extra() if extra is not None else {}
        if weight is not None:
            params = {weight: dict(model.named_parameters())[weight].detach().clone()}
            return (lambda p: out(torch.func.functional_call(
                model, p, (), {"inputs_embeds": x, **more}))), (params,)
        return (lambda x: out(model(inputs_embeds=x, **more))), (x,)

    return build


def _inputs(make, x, key):
    def build():
        model = _model(make)
        return (lambda x: model(**{key: x}).last_hidden_state), (x,)

    return build


def transformers_cases():
    import transformers as tf

    small = dict(vocab_size=99, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=37, max_position_embeddings=64)
    decoder = dict(vocab_size=99, hidden_size=H, intermediate_size=37, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    pad = lambda: {"attention_mask": torch.tensor([[1, 1, 1, 0]])}  # noqa: E731
    dec = lambda: {"decoder_inputs_embeds": _rand(1, 3, H, seed=2)}  # noqa: E731
    seq2seq = dict(vocab_size=99, d_model=H, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
                   decoder_ffn_dim=37, max_position_embeddings=64)
    vision = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=H,
                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    t5 = dict(vocab_size=99, d_model=H, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
              relative_attention_num_buckets=8)
    whisper = dict(vocab_size=99, d_model=H, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
                   decoder_ffn_dim=37, num_mel_bins=8, max_source_positions=8,
                   max_target_positions=16, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, decoder_start_token_id=1)
    w2v = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
               conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
               num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    mamba = dict(vocab_size=99, hidden_size=H, state_size=4, num_hidden_layers=1, expand=2,
                 conv_kernel=4, time_step_rank=4)
    C = Case
    return [
        C("transformers", "bert", _embeds(lambda: tf.BertModel(tf.BertConfig(**small)))),
        C("transformers", "bert[query.weight]", _embeds(
            lambda: tf.BertModel(tf.BertConfig(**small)),
            weight="encoder.layer.0.attention.self.query.weight")),
        C("transformers", "bert[padded]", _embeds(
            lambda: tf.BertModel(tf.BertConfig(**small)), extra=pad)),
        C("transformers", "gpt2", _embeds(lambda: tf.GPT2Model(tf.GPT2Config(
            vocab_size=99, n_embd=H, n_layer=1, n_head=2, n_positions=64)))),
        C("transformers", "distilbert", _embeds(lambda: tf.DistilBertModel(tf.DistilBertConfig(
            vocab_size=99, dim=H, n_layers=1, n_heads=2, hidden_dim=37,
            max_position_embeddings=64)))),
        C("transformers", "roberta", _embeds(lambda: tf.RobertaModel(tf.RobertaConfig(**small)))),
        C("transformers", "bart", _embeds(lambda: tf.BartModel(tf.BartConfig(**seq2seq)),
                                          extra=dec)),
        C("transformers", "vit", _inputs(lambda: tf.ViTModel(tf.ViTConfig(**vision)),
                                         _rand(1, 3, 8, 8), "pixel_values")),
        C("transformers", "clip-vision", _inputs(
            lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision)), _rand(1, 3, 8, 8),
            "pixel_values")),
        C("transformers", "whisper-encoder", _inputs(
            lambda: tf.WhisperModel(tf.WhisperConfig(**whisper)).get_encoder(),
            _rand(1, 8, 16), "input_features")),
        C("transformers", "wav2vec2", _inputs(
            lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(**w2v)), _rand(1, 40), "input_values")),
        C("transformers", "llama", _embeds(lambda: tf.LlamaModel(tf.LlamaConfig(**decoder))),
          casts=True),
        C("transformers", "llama[padded]", _embeds(
            lambda: tf.LlamaModel(tf.LlamaConfig(**decoder)), extra=pad), casts=True),
        C("transformers", "llama[gate_proj.weight]", _embeds(
            lambda: tf.LlamaModel(tf.LlamaConfig(**decoder)),
            weight="layers.0.mlp.gate_proj.weight"), casts=True),
        C("transformers", "qwen2", _embeds(lambda: tf.Qwen2Model(tf.Qwen2Config(**decoder))),
          casts=True),
        C("transformers", "gemma", _embeds(lambda: tf.GemmaModel(tf.GemmaConfig(
            **decoder, head_dim=8))), casts=True),
        C("transformers", "mistral", _embeds(
            lambda: tf.MistralModel(tf.MistralConfig(**decoder))), casts=True),
        C("transformers", "t5-encoder", _embeds(
            lambda: tf.T5EncoderModel(tf.T5Config(**t5))), casts=True),
        C("transformers", "t5", _embeds(lambda: tf.T5Model(tf.T5Config(**t5)), extra=dec),
          casts=True),
        C("transformers", "mamba", _embeds(lambda: tf.MambaModel(tf.MambaConfig(**mamba))),
          casts=True),
    ]


LIBS = {"torchvision": torchvision_cases, "timm": timm_cases,
        "transformers": transformers_cases}


# --- checking -------------------------------------------------------------------------------


class NoFloat32(TorchFunctionMode):
    """Casts of float64 tensors to float32 (``.to``, ``.float()``, ``.type``) made no-ops: a
    model that upcasts for its norms then computes in float64 throughout."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("to", "float", "type") and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            rest = list(args[1:]) + list(kwargs.values())
            if x.dtype == D and (name == "float" or torch.float32 in rest
                                 or "torch.FloatTensor" in rest):
                return x
        return func(*args, **kwargs)


def _without_casts(fn):
    def wrapped(*args):
        with NoFloat32():
            return fn(*args)

    return wrapped


def _leaves(obj):
    from torch.utils import _pytree as pytree

    return pytree.tree_leaves(obj, is_leaf=lambda x: hasattr(x, "todense"))


def _differs(got, ref) -> str:
    """"" where ``got`` (sparsejac's) is ``ref`` (jacrev's), else how it differs."""
    g, r = _leaves(got), _leaves(ref)
    if len(g) != len(r):
        return f"{len(g)} blocks, jacrev has {len(r)}"
    for a, b in zip(g, r):
        b = b.detach()
        if tuple(a.shape) != tuple(b.shape):
            return f"shape {tuple(a.shape)}, jacrev's {tuple(b.shape)}"
        a = torch.as_tensor(a.todense()).reshape(b.shape)
        scale = float(b.abs().max()) if b.numel() else 0.0
        try:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(scale, 1.0))
        except AssertionError as e:
            rel = float((a - b).abs().max()) / max(scale, 1e-300)
            what = next((w.strip() for w in str(e).splitlines() if "Mismatch" in w), "")
            return f"{what}, largest difference {rel:.1e} of the largest entry"
    return ""


def _relative(got, ref) -> float:
    """The largest difference over the largest entry, block by block."""
    worst = 0.0
    for a, b in zip(_leaves(got), _leaves(ref)):
        b = b.detach()
        a = torch.as_tensor(a.todense()).reshape(b.shape)
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300))
    return worst


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def check(case: Case, timeout: int = 600) -> tuple[str, str, float]:
    """``(verdict, detail, seconds)`` of one case."""
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        try:
            fn, args = case.build()
            ref = torch.func.jacrev(fn)(*args)
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001
            return "skip", f"jacrev or the model fails: {type(e).__name__}: {e}"[:300], 0.0
        try:
            got = sparsejac.jacobian_of(fn, *args, memory_limit=LIMIT)
        except JacobianTooLargeError as e:
            return "refused-memory", str(e)[:300], time.perf_counter() - t0
        except SparsejacError as e:
            return "refused-op", str(e)[:300], time.perf_counter() - t0
        detail = _differs(got, ref)
        if not detail:
            return "exact", "", time.perf_counter() - t0
        if case.casts:  # is it the model's float32 casts? both again without them
            plain = _without_casts(fn)
            ref64 = torch.func.jacrev(plain)(*args)
            got64 = sparsejac.jacobian_of(plain, *args, memory_limit=LIMIT)
            again = _differs(got64, ref64)
            if not again and _relative(got, ref) < CASTS:
                return "casts", f"with float32 casts: {detail}", time.perf_counter() - t0
            detail = f"{detail}; without the casts too: {again}"
        return "wrong", detail[:300], time.perf_counter() - t0
    except Timeout:
        return "timeout", f"over {timeout} s", time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (what the census counts as a crash)
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return ("crash", f"{type(e).__name__}: {e} ({tb.filename}:{tb.lineno})"[:300],
                time.perf_counter() - t0)
    finally:
        signal.alarm(0)
        gc.collect()


def _row(rows, lib, name, verdict, detail, secs):
    rows.append((lib, name, verdict, detail, secs))
    print(f"{lib:12s} {name:48s} {verdict:15s} {secs:7.1f}s {detail[:160]}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", nargs="*", default=list(LIBS), choices=list(LIBS))
    ap.add_argument("--only", nargs="*", default=(), help="case names to run")
    ap.add_argument("--skip", nargs="*", default=(), help="case names to leave out")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    ap.add_argument("--markdown", help="write the table of cases here")
    ap.add_argument("--part", default="1/1", help="K/N: run the K-th of N shares of the cases")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    k, n = map(int, args.part.split("/"))
    rows = []
    for lib in args.lib:
        for i, case in enumerate(LIBS[lib]()):
            if (args.only and case.name not in args.only) or case.name in args.skip:
                continue
            if i % n != k - 1:
                continue
            verdict, detail, secs = check(case, args.timeout)
            _row(rows, case.lib, case.name, verdict, detail, secs)
            if verdict == "refused-memory" and case.fallback is not None:
                first = Case(case.lib, case.name, case.fallback, case.casts)
                verdict, detail, secs = check(first, args.timeout)
                _row(rows, case.lib, f"{case.name}[first vector]", verdict, detail, secs)
    counts = collections.Counter((lib, v) for lib, _, v, _, _ in rows)
    libs = sorted({lib for lib, *_ in rows})
    print("\n" + f"{'verdict':15s}" + "".join(f"{lib:>13s}" for lib in libs) + f"{'all':>7s}")
    for v in ORDER:
        n = [counts[(lib, v)] for lib in libs]
        if sum(n):
            print(f"{v:15s}" + "".join(f"{k:13d}" for k in n) + f"{sum(n):7d}")
    if args.markdown:
        lines = ["| library | case | verdict | seconds | detail |", "|---|---|---|---|---|"]
        for lib, name, v, detail, secs in rows:
            lines.append(f"| {lib} | `{name}` | {v} | {secs:.1f} | {detail.replace('|', '/')} |")
        pathlib.Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 1 if any(v == "wrong" for _, _, v, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
