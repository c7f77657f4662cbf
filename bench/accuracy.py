"""Accuracy table of ``skew_expm``: ``python -m bench.accuracy [--methods ...] [--blocks ...] [--json PATH]``.

For every method, block size ``b``, input dtype and Frobenius norm it exponentiates a seeded stack of 16
random skew matrices and prints, as a markdown table, ``orth / rel``: the max ``|R^T R - I|`` (``R`` upcast
to fp64) and the max relative Frobenius error against SciPy's fp64 ``expm`` of the same input (after its
rounding to the dtype, so input rounding is not counted). Method ``native`` is ``torch.linalg.matrix_exp``
called directly in the half-precision input dtype, without the upcast of ``exact``. Needs SciPy (the
``train`` extra).
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import write_json
from liere.expm import orthogonality_error, skew_expm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = (1e-2, 1.0, 10.0, 100.0, 1000.0)
METHODS = ("exact", "native", "closed", "taylor_cans")


def random_skew(n: int, b: int, norm: float, seed: int = 0) -> torch.Tensor:
    """``(n, b, b)`` fp64 random skew matrices, each with Frobenius norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, b, b, generator=g, dtype=torch.float64)
    M = M - M.mT
    return M / torch.linalg.matrix_norm(M)[:, None, None] * norm


def measure(methods: list[str], blocks: list[int], n: int = 16) -> list[dict]:
    """One record per (method, block, dtype, norm) with ``orth_error`` and ``rel_error``."""
    from scipy.linalg import expm

    records = []
    for b in blocks:
        for norm in NORMS:
            A64 = random_skew(n, b, norm, seed=b)
            for dname, dtype in DTYPES.items():
                A = A64.to(dtype)
                ref = torch.stack([torch.from_numpy(expm(a)) for a in A.double().numpy()])
                for method in methods:
                    if (method == "closed" and b > 4) or (method == "native" and dtype == torch.float32):
                        continue
                    R = torch.linalg.matrix_exp(A) if method == "native" else skew_expm(A, method)
                    rel = torch.linalg.matrix_norm(R.double() - ref) / math.sqrt(b)
                    records.append(
                        dict(
                            method=method,
                            block=b,
                            dtype=dname,
                            norm=norm,
                            orth_error=float(orthogonality_error(R)),
                            rel_error=float(rel.max()) if rel.isfinite().all() else math.nan,
                        )
                    )
    return records


def markdown(records: list[dict], header: bool = True) -> str:
    """Rows (method, b, dtype), one ``orth / rel`` column per norm (``header=False``: the rows alone)."""
    norms = sorted({r["norm"] for r in records})
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["method"], r["block"], r["dtype"]), {})[r["norm"]] = r
    lines = [
        "| method | b | dtype | " + " | ".join(f"norm {x:g}" for x in norms) + " |",
        "|---|---|---|" + "---|" * len(norms),
    ][: 2 if header else 0]
    for (method, b, dname), cells in rows.items():
        text = [f"{cells[x]['orth_error']:.1e} / {cells[x]['rel_error']:.1e}" for x in norms]
        lines.append(f"| {method} | {b} | {dname} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS + ("auto",), help="skew_expm methods"
    )
    parser.add_argument("--blocks", nargs="+", type=int, default=[2, 3, 4, 8, 16, 64], help="block sizes b")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the records (and the run's metadata) to this JSON file"
    )
    args = parser.parse_args(argv)
    print("Cells: max |R^T R - I| / max relative error vs SciPy fp64 expm, 16 matrices per cell.\n", flush=True)
    records = []
    for i, b in enumerate(args.blocks):  # each block size printed as soon as it is measured
        records += measure(args.methods, [b])
        print(markdown([r for r in records if r["block"] == b], header=i == 0), flush=True)
    write_json(dict(records=records), args.json)


if __name__ == "__main__":
    main()
