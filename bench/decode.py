"""Decoding speed: ``python -m bench.decode [--size tiny|char] [--device cpu|cuda] [--json PATH]``.

Generates ``new`` tokens after a ``prompt``-token prompt with ``models.CharLM.generate`` (greedy, batch 1,
fp32) with its kv cache (each step feeds one token: one rotation at its position, attention over the cache)
and without it (each step recomputes the whole sequence), timed round-robin, and prints tokens/s of both
and their ratio, one row per encoding as it is measured. ``--size tiny`` (the default) runs in under a
minute on a 2-core CPU; ``char`` is the benchmark char-LM (6 layers, width 512, 8 heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.common import bench_parser, describe, markdown_table, registry_examples, time_ms, write_json
from models import LM_SIZES, CharLM

SIZES = {"tiny": dict(prompt=32, new=48), "char": dict(prompt=128, new=256)}
COLUMNS = [
    ("encoding", "encoding"),
    ("cached_tok_s", "cached tok/s"),
    ("uncached_tok_s", "uncached tok/s"),
    ("speedup", "cached / uncached"),
]


def bench_encoding(spec: str, size: str, device: torch.device, repeats: int) -> dict:
    """Tokens/s of cached and uncached greedy decoding of one ``CharLM`` with encoding ``spec``."""
    torch.manual_seed(0)
    prompt, new = SIZES[size]["prompt"], SIZES[size]["new"]
    model = CharLM(96, encoding=spec, size=size).to(device).eval()
    idx = torch.randint(0, 96, (1, prompt), device=device)
    fns = {
        use_cache: (lambda use_cache=use_cache: model.generate(idx, new, temperature=0.0, use_cache=use_cache))
        for use_cache in (True, False)
    }
    ms = time_ms({str(k): fn for k, fn in fns.items()}, device, repeats)
    cached, uncached = new / (ms["True"] / 1e3), new / (ms["False"] / 1e3)
    return dict(encoding=spec, cached_tok_s=cached, uncached_tok_s=uncached, speedup=cached / uncached)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print each row as measured and the table, return (and optionally write) the rows."""
    parser = bench_parser("python -m bench.decode", __doc__.splitlines()[0], list(SIZES), "generate calls")
    parser.set_defaults(repeats=2)
    parser.add_argument(
        "--encodings",
        nargs="+",
        default=registry_examples(1),
        help="factory specs (default: the example spec of every registered 1D encoding)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or "tiny"
    config = LM_SIZES[size] | SIZES[size]
    results: dict = dict(device=describe(device), size=size, config=config, rows=[])
    print(f"# liere decoding benchmark: {results['device']}, size {size} {config}\n")
    for spec in args.encodings:
        row = bench_encoding(spec, size, device, args.repeats)
        results["rows"].append(row)
        print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    print("\n" + markdown_table(results["rows"], COLUMNS) + "\n")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
