"""Inference speed with and without the rotation cache: ``python -m bench.infer [--size tiny|real] [--json PATH]``.

Two benchmarks, each encoding as a ratio to its RoPE baseline in the same cache mode, the encodings of one cache
mode timed round-robin (medians) so that machine noise hits them alike:

- **ViT**: eval-mode forward under ``torch.inference_mode`` of timm's ``vit_small_patch16_224`` adapted with
  ``liere.integrations.timm.liere_timm_vit`` at 224 px, batch 1 and 8; baseline ``axial-rope``. Cache modes:
  ``on`` (warm: the rotations come from the cache), ``cold`` (the cache cleared before every call: the first call's
  cost) and ``off`` (``liere.cache.rotation_cache_disabled``: what every call cost before the cache); ``cold`` and
  ``off`` are timed in one round-robin run, so their times compare directly. Serving modes, timed in a third
  round-robin run: ``frozen`` (``freeze_rotations``: the rotations are constants) eager, the same
  ``torch.compile``d, the unfrozen model ``torch.compile``d (the cache is bypassed under compile: every call
  computes the rotations), and, where onnx/onnxscript/onnxruntime are installed, the frozen model exported with
  ``torch.onnx.export(dynamo=True)`` and run in ONNX Runtime (``runtime`` says which: eager, compiled, onnxruntime);
- **decoding**: tokens/s of kv-cached greedy decoding (``models.CharLM.generate``'s loop) on the benchmark char-LM
  (``size="char"``: 6 layers, width 512, 8 heads), 128-token prompt, 64 new tokens, batch 1, timed per token
  round-robin (``decoding_step_times``); baseline ``rope``; cache ``on``/``off``.

Rows print as they are measured. ``--size tiny`` shrinks both models to run in seconds (the test's size). CPU,
``--threads`` (default 1) threads.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from functools import partial

import timm
import torch

from bench.common import RowPrinter, bench_parser, describe, time_ms, write_json
from liere.cache import rotation_cache_disabled
from liere.integrations.timm import liere_timm_vit
from models import CharLM
from models.blocks import KVCache

ENCODINGS = ("liere8", "liere64", "rope-mixed")
VIT_BASELINE, LM_BASELINE = "axial-rope", "rope"
SIZES = {
    "real": dict(vit=dict(img_size=224), batches=(1, 8), lm=dict(size="char"), prompt=128, new=64, vocab=96),
    "tiny": dict(
        vit=dict(img_size=32, depth=2, embed_dim=128, num_heads=2),
        batches=(1, 2),
        lm=dict(size="tiny", dim=64, depth=2, heads=1),
        prompt=8,
        new=4,
        vocab=16,
    ),
}
VIT_COLUMNS = [
    ("model", "model"),
    ("encoding", "encoding"),
    ("cache", "cache"),
    ("runtime", "runtime"),
    ("ms", "ms"),
    ("ratio", "ratio"),
]
SERVING = (("frozen", "eager"), ("frozen", "compiled"), ("off", "compiled"), ("frozen", "onnxruntime"))
LM_COLUMNS = [("model", "model"), ("encoding", "encoding"), ("cache", "cache"), ("tok_s", "tok/s"), ("ratio", "ratio")]


def vit(spec: str, size: str) -> torch.nn.Module:
    """timm ViT-S/16 (or its tiny variant) with encoding ``spec``, eval mode, random weights."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **SIZES[size]["vit"])
    return liere_timm_vit(model, spec).eval()


def char_lm(spec: str, size: str) -> CharLM:
    torch.manual_seed(0)
    return CharLM(SIZES[size]["vocab"], encoding=spec, **SIZES[size]["lm"]).eval()


def in_mode(fn: Callable[[], object], cache: str, encoding: torch.nn.Module) -> Callable[[], object]:
    """``fn`` run with the rotation cache ``on``, ``cold`` (cleared first) or ``off``."""

    def run() -> object:
        if cache == "off":
            with rotation_cache_disabled():
                return fn()
        if cache == "cold":
            encoding.clear_cache()
        return fn()

    return run


def with_ratios(rows: list[dict], key: str, baseline: str) -> list[dict]:
    """Set ``ratio`` of every row to its ``key`` over the baseline encoding's in the same cache mode and runtime."""
    base = {(r["cache"], r.get("runtime")): r[key] for r in rows if r["encoding"] == baseline}
    for r in rows:
        r["ratio"] = r[key] / base[r["cache"], r.get("runtime")]
    return rows


def onnx_installed() -> bool:
    """Whether ONNX export and ONNX Runtime are importable (onnx, onnxscript, onnxruntime)."""
    return all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


def onnxruntime_call(model: torch.nn.Module, images: torch.Tensor, threads: int) -> Callable[[], object]:
    """``model`` exported with the dynamo exporter at ``images``' shape, as a call running it in ONNX Runtime."""
    import onnxruntime

    program = torch.onnx.export(model, (images,), dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: images.numpy()}
    return lambda: session.run(None, feed)


def serving_calls(model: torch.nn.Module, images: torch.Tensor, threads: int) -> dict[tuple[str, str], Callable]:
    """The ``SERVING`` variants of one eval model as calls on ``images`` (ONNX Runtime only where installed)."""
    frozen = copy.deepcopy(model).freeze_rotations()
    calls = {
        ("frozen", "eager"): partial(frozen, images),
        ("frozen", "compiled"): partial(torch.compile(frozen, dynamic=False), images),
        ("off", "compiled"): partial(torch.compile(model, dynamic=False), images),
    }
    if onnx_installed():
        calls["frozen", "onnxruntime"] = onnxruntime_call(frozen, images, threads)
    return {mode: calls[mode] for mode in SERVING if mode in calls}


def bench_vit(size: str, batch: int, repeats: int, show: Callable[[list[dict]], None], threads: int = 1) -> list[dict]:
    """Forward times of every encoding in each cache mode, then in each serving mode, at ``batch`` (one
    round-robin run per group of modes, each group's rows handed to ``show`` as soon as measured)."""
    device = torch.device("cpu")
    images = torch.randn(batch, 3, SIZES[size]["vit"]["img_size"], SIZES[size]["vit"]["img_size"])
    models = {spec: vit(spec, size) for spec in (VIT_BASELINE, *ENCODINGS)}
    name = f"{'ViT-S/16' if size == 'real' else 'tiny ViT'} {SIZES[size]['vit']['img_size']}px batch {batch}"
    rows = []
    for modes in (("on",), ("cold", "off")):  # cold and off together: the first call against the old cost
        fns = {
            f"{s}|{c}": in_mode(lambda m=m: m(images), c, m.liere_encoding) for c in modes for s, m in models.items()
        }
        with torch.inference_mode():
            ms = time_ms(fns, device, repeats)
        measured = [
            dict(model=name, encoding=s, cache=c, runtime="eager", ms=ms[f"{s}|{c}"]) for c in modes for s in models
        ]
        rows += with_ratios(measured, "ms", VIT_BASELINE)
        show(measured)
    calls = {spec: serving_calls(m, images, threads) for spec, m in models.items()}  # freezing needs versions
    with torch.inference_mode():
        fns = {(mode, spec): call for spec in models for mode, call in calls[spec].items()}
        ms = time_ms(dict(sorted(fns.items())), device, repeats)
    measured = [
        dict(model=name, encoding=spec, cache=cache, runtime=runtime, ms=ms[(cache, runtime), spec])
        for (cache, runtime) in SERVING
        for spec in models
        if ((cache, runtime), spec) in ms
    ]
    rows += with_ratios(measured, "ms", VIT_BASELINE)
    show(measured)
    return rows


def decode_steps(model: CharLM, prompt: torch.Tensor, new: int) -> Iterator[None]:
    """Greedy kv-cached decoding (``CharLM.generate``'s loop), one step per ``next()``: the prompt, then each token."""
    cache = KVCache()
    token = prompt
    for _ in range(new + 1):
        token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
        yield


def decoding_step_times(models: dict[str, CharLM], prompt: torch.Tensor, new: int, repeats: int) -> dict[str, float]:
    """Median seconds per decoded token of each model, round-robin at the token level (each model decodes one token
    in turn, in an order that rotates every step), over ``repeats`` decodings (after one warm-up) of ``new`` tokens;
    the prompt's forward is excluded."""
    specs = list(models)
    times: dict[str, list[float]] = {s: [] for s in specs}
    for rep in range(repeats + 1):
        runs = {s: decode_steps(models[s], prompt, new) for s in specs}
        for step in range(new + 1):
            shift = step % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                start = time.perf_counter()
                next(runs[spec])
                if rep and step:
                    times[spec].append(time.perf_counter() - start)
    return {s: statistics.median(t) for s, t in times.items()}


def bench_decoding(size: str, repeats: int, show: Callable[[list[dict]], None]) -> list[dict]:
    """Tokens/s of kv-cached greedy decoding of every encoding with the cache on and off (one run per mode, each
    mode's rows handed to ``show`` as soon as measured)."""
    config = SIZES[size]
    prompt = torch.randint(0, config["vocab"], (1, config["prompt"]), generator=torch.Generator().manual_seed(0))
    models = {spec: char_lm(spec, size) for spec in (LM_BASELINE, *ENCODINGS)}
    name = f"char-LM prompt {config['prompt']} + {config['new']} tokens"
    rows = []
    for cache in ("on", "off"):
        with torch.no_grad(), rotation_cache_disabled() if cache == "off" else nullcontext():
            seconds = decoding_step_times(models, prompt, config["new"], repeats)
        rows += with_ratios(
            [dict(model=name, encoding=s, cache=cache, tok_s=1 / seconds[s]) for s in models], "tok_s", LM_BASELINE
        )
        show(rows[-len(models) :])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    """Run both benchmarks, print rows as measured and the tables, return (and optionally write) the results."""
    parser = bench_parser("python -m bench.infer", __doc__.splitlines()[0], list(SIZES), "calls per variant")
    parser.set_defaults(size="real", repeats=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip", choices=["vit", "decoding"], help="leave one benchmark out")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("bench.infer measures the CPU (--device cpu)")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results: dict = dict(
        command="python -m bench.infer " + " ".join(sys.argv[1:] if argv is None else argv),
        device=describe(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        load_average=os.getloadavg(),
        size=args.size,
        vit=[],
        decoding=[],
    )
    print(f"# liere inference benchmark: {results['device']}, size {args.size}, load {results['load_average']}\n")
    if args.skip != "vit":
        show = RowPrinter(VIT_COLUMNS)
        for batch in SIZES[args.size]["batches"]:
            results["vit"] += bench_vit(args.size, batch, args.repeats, show, args.threads)
    if args.skip != "decoding":
        print()
        results["decoding"] = bench_decoding(args.size, args.repeats, RowPrinter(LM_COLUMNS))
    results["load_average_after"] = os.getloadavg()
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
