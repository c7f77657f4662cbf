"""Markdown report of an A/B run folder: settings, main table with CIs and paired tests, evaluations, plots.

    python -m train.report runs/ab-arrow-20260101-120000 [--reference rope-mixed]

Reads ``results.json`` and, per run, ``evaluation.json`` / ``test_correct.pt`` (``train.evaluate``); writes
``report.md`` and its PNG plots into the folder. Sections whose evaluations are missing are left out.
Every number over seeds is the mean with a 95% percentile-bootstrap interval (``train.stats.bootstrap_ci``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from train import inspect, plots
from train.stats import Interval, bootstrap_ci, mcnemar_test, sign_flip_test

EVALUATION_FILE, CORRECT_FILE = "evaluation.json", "test_correct.pt"  # per run folder, written by train.evaluate
SETTINGS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "eval_samples",
            "data_seed", "data_options", "model_options")  # fmt: skip


def main_fraction(results: dict[str, Any]) -> float:
    """The training fraction of the main table's runs (the largest of ``--data-fractions``; 1.0 without them)."""
    return max(r.get("fraction", 1.0) for r in results["runs"])


def main_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs trained on the main fraction, in results order."""
    fraction = main_fraction(results)
    return [r for r in results["runs"] if r.get("fraction", 1.0) == fraction]


def chance_level(results: dict[str, Any]) -> float | None:
    """Accuracy of guessing, ``1 / num_classes`` of the runs' model (None for other metrics or unknown classes)."""
    classes = results["runs"][0].get("model_spec", {}).get("kwargs", {}).get("num_classes")
    return 1 / classes if results["metric"] == "accuracy" and classes else None


def _scale(metric: str) -> tuple[float, int, str]:
    """Table scale, digits and unit of a metric (accuracy in percent)."""
    return (100.0, 1, " (%)") if metric == "accuracy" else (1.0, 3, "")


def _correct(root: Path, runs: Sequence[dict[str, Any]]) -> torch.Tensor | None:
    """Per-example test correctness of ``runs`` concatenated in seed order, or None if any is missing."""
    paths = [root / r["run_dir"] / CORRECT_FILE for r in sorted(runs, key=lambda r: r["seed"])]
    if not paths or not all(p.is_file() for p in paths):
        return None
    return torch.cat([torch.load(p, weights_only=True) for p in paths])


def resolve_reference(rows: Sequence[dict[str, Any]], reference: str | None, higher_is_better: bool) -> str:
    """``reference`` when it is one of the encodings, else (None) the best encoding by mean."""
    names = [r["encoding"] for r in rows]
    if reference is not None and reference not in names:
        raise ValueError(f"--reference: {reference!r} is not one of the encodings {names}")
    best = (max if higher_is_better else min)(rows, key=lambda r: r["mean"])
    return reference or best["encoding"]


def summarize(results: dict[str, Any], root: str | Path, reference: str | None = None) -> list[dict[str, Any]]:
    """Per encoding (main-fraction runs): per-seed values, mean and CI, cost, and paired tests against the reference.

    ``delta`` is mean minus the reference's mean; ``p_seeds`` the sign-flip test over shared seeds; ``p_mcnemar``
    the McNemar test over the pooled test examples of those seeds (classification only; None if unavailable).
    """
    root, runs = Path(root), main_runs(results)
    rows = []
    for encoding in results["encodings"]:
        mine = sorted((r for r in runs if r["encoding"] == encoding), key=lambda r: r["seed"])
        values = [r["test"][r["metric"]] for r in mine]
        ci = bootstrap_ci(values)
        rows.append({
            "encoding": encoding, "params": mine[0]["params"], "seeds": [r["seed"] for r in mine], "values": values,
            "mean": ci.mean, "low": ci.low, "high": ci.high,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "val_mean": statistics.fmean(r["val"][r["metric"]] for r in mine),
            "step_time_ms": statistics.fmean(r["step_time_ms"] for r in mine),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
        })  # fmt: skip
    ref_name = resolve_reference(rows, reference, results["higher_is_better"])
    ref = next(r for r in rows if r["encoding"] == ref_name)
    for row in rows:
        row["step_time_ratio"] = row["step_time_ms"] / rows[0]["step_time_ms"]
        row |= {"reference": ref_name, "delta": row["mean"] - ref["mean"], "p_seeds": None, "p_mcnemar": None}
        shared = sorted(set(row["seeds"]) & set(ref["seeds"]))
        if row is ref or not shared:
            continue
        if 2 <= len(shared) <= 16:  # one seed has no spread to test against
            row["p_seeds"] = sign_flip_test(*([v for s, v in zip(r["seeds"], r["values"], strict=True) if s in shared]
                                              for r in (row, ref)))  # fmt: skip
        a, b = (_correct(root, [r for r in runs if r["encoding"] == e["encoding"] and r["seed"] in shared])
                for e in (row, ref))  # fmt: skip
        if a is not None and b is not None and len(a) == len(b):
            row["p_mcnemar"] = mcnemar_test(a.tolist(), b.tolist())
    return rows


def _p(value: float | None) -> str:
    """A p-value for a table: 3 significant digits; one that underflowed to 0 as ``<1e-300``."""
    if value is None:
        return "—"
    return "<1e-300" if value == 0 else f"{value:.3g}"


def main_table(rows: Sequence[dict[str, Any]], metric: str, memory_kind: str) -> str:
    """Markdown table of ``summarize`` rows: metric mean [95% CI], Δ and p-values vs the reference, cost."""
    scale, digits, unit = _scale(metric)
    memory = "peak GPU MiB" if memory_kind == "cuda_allocated" else "process peak RSS MiB"
    lines = [
        f"| encoding | params | test {metric}{unit} [95% CI] | Δ vs ref | p (seeds) | p (McNemar) | "
        f"val {metric}{unit} | step ms | x first | {memory} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ci = Interval(r["mean"], r["low"], r["high"], len(r["values"])).format(digits, scale)
        delta = "ref" if r["encoding"] == r["reference"] else f"{scale * r['delta']:+.{digits}f}"
        lines.append(
            f"| {r['encoding']} | {r['params']:,} | {ci} | {delta} | {_p(r['p_seeds'])} | {_p(r['p_mcnemar'])} | "
            f"{scale * r['val_mean']:.{digits}f} | {r['step_time_ms']:.1f} | {r['step_time_ratio']:.2f} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def _evaluations(root: Path, runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per encoding, the ``evaluation.json`` contents of its runs that have one."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        path = root / run["run_dir"] / EVALUATION_FILE
        if path.is_file():
            found[run["encoding"]].append(json.loads(path.read_text()))
    return found


def per_encoding(evals: dict[str, list[dict[str, Any]]], pick: Callable[[dict[str, Any]], Any]) -> dict[str, list]:
    """``pick(evaluation)`` for each run of each encoding; empty picks and encodings left with none are dropped."""
    found = {e: [p for x in xs if (p := pick(x))] for e, xs in evals.items()}
    return {e: picks for e, picks in found.items() if picks}


def shuffle_section(evals: dict[str, list[dict[str, Any]]], root: Path, chance: float | None = None) -> str | None:
    """Patch-shuffle table (accuracy, shuffled accuracy, drop; mean [CI] over seeds) and its bar plot."""
    found = per_encoding(evals, lambda x: x.get("shuffle"))
    if not found:
        return None
    keys = ("accuracy", "shuffled_accuracy", "drop")
    cis = {e: {k: bootstrap_ci([x[k] for x in xs]) for k in keys} for e, xs in found.items()}
    lines = ["| encoding | accuracy (%) | shuffled accuracy (%) | drop (points) |", "|---|---:|---:|---:|"]
    lines += [f"| {e} | " + " | ".join(c[k].format(1, 100) for k in keys) + " |" for e, c in cis.items()]
    plots.ci_bars(list(cis), {"unshuffled": [c["accuracy"] for c in cis.values()],
                              "patches shuffled": [c["shuffled_accuracy"] for c in cis.values()]},
                  "accuracy", "patch shuffle", root / "shuffle.png", chance)  # fmt: skip
    intro = ("Test accuracy when each test image's patches (tubelets for clips) are permuted with a fixed "
             "seeded permutation per image; a large drop means the model uses patch positions.")  # fmt: skip
    return "\n\n".join(["## Patch-shuffle diagnostic", intro, "\n".join(lines), "![patch shuffle](shuffle.png)"])


def _grouped(records: dict[str, list[list[dict[str, Any]]]], key: Callable[[dict], Any], value: str
             ) -> dict[str, dict[Any, Interval]]:  # fmt: skip
    """Per series name ``encoding`` -> {key(record): CI of ``value`` over the encoding's runs}."""
    out: dict[str, dict[Any, Interval]] = {}
    for encoding, per_run in records.items():
        by_key: dict[Any, list[float]] = defaultdict(list)
        for run_records in per_run:
            for rec in run_records:
                by_key[key(rec)].append(rec[value])
        out[encoding] = {k: bootstrap_ci(v) for k, v in by_key.items()}
    return out


def extrapolation_sections(evals: dict[str, list[dict[str, Any]]], root: Path, chance: float | None = None
                           ) -> list[str]:  # fmt: skip
    """One table and line plot per extrapolation kind ("resize" images, arrow "canvas"): accuracy vs factor."""
    sections = []
    for kind, title in (("resize", "resized test images"), ("canvas", "larger arrow canvas, same cell size")):
        records = per_encoding(evals, lambda x, kind=kind: [r for r in x.get("extrapolate", []) if r["kind"] == kind])
        if not records:
            continue
        sample = next(iter(records.values()))[0]
        factors = sorted({r["factor"] for r in sample})
        shape = {r["factor"]: ("x".join(map(str, r["size"])) + ("*" if r["rounded"] else "")) for r in sample}
        grid = {r["factor"]: "x".join(map(str, r["grid"])) for r in sample}
        cis = _grouped(records, lambda r: (r["mode"], r["factor"]), "accuracy")
        header = " | ".join(f"{f:g}x: {shape[f]}, grid {grid[f]}" for f in factors)
        lines = [f"| encoding | coords | {header} |", "|---|---|" + "---:|" * len(factors)]
        panels: dict[str, plots.Series] = defaultdict(dict)
        for encoding, by_key in cis.items():
            for mode in sorted({m for m, _ in by_key}):
                lines.append(f"| {encoding} | {mode} | " + " | ".join(by_key[mode, f].format(1, 100) for f in factors)
                             + " |")  # fmt: skip
                panels[f"{mode} coordinates"][encoding] = (factors, [by_key[mode, f] for f in factors])
        name = f"extrapolate_{kind}.png"
        plots.ci_lines(panels, "scale factor (patch grid)", "accuracy", f"extrapolation: {title}", root / name,
                       chance=chance, xticklabels={f: f"{f:g}x\n{grid[f]}" for f in factors})  # fmt: skip
        note = (
            "Test accuracy (%) vs scale factor. `index`: patch coordinates keep their spacing (a larger grid "
            "covers a larger range); `stretch`: the larger grid is squeezed onto the trained coordinate range."
        )
        if any(shape[f].endswith("*") for f in factors):
            note += " `*`: size rounded to the nearest multiple of the patch size."
        sections.append("\n\n".join([f"## Resolution extrapolation: {title}", note, "\n".join(lines),
                                     f"![{kind} extrapolation]({name})"]))  # fmt: skip
    return sections


def length_section(evals: dict[str, list[dict[str, Any]]], root: Path) -> str | None:
    """Bits per character vs evaluation length (multiple of the training context): table and line plot."""
    records = per_encoding(evals, lambda x: x.get("length"))
    if not records:
        return None
    sample = next(iter(records.values()))[0]
    multiples = [r["multiple"] for r in sample]
    cis = _grouped(records, lambda r: r["multiple"], "bpc")
    lengths = {r["multiple"]: r["length"] for r in sample}
    lines = ["| encoding | " + " | ".join(f"{m}x ({lengths[m]} tokens)" for m in multiples) + " |",
             "|---|" + "---:|" * len(multiples)]  # fmt: skip
    lines += [f"| {e} | " + " | ".join(c[m].format(3) for m in multiples) + " |" for e, c in cis.items()]
    plots.ci_lines({"": {e: (multiples, [c[m] for m in multiples]) for e, c in cis.items()}},
                   "evaluation length (multiple of the training context)", "bpc", "length extrapolation",
                   root / "length.png", xticklabels={m: f"{m}x" for m in multiples}, log_x=True)  # fmt: skip
    intro = "Test bits per character (lower is better) in windows of 1x, 2x, ... the training context."
    return "\n\n".join(["## Length extrapolation", intro, "\n".join(lines), "![length extrapolation](length.png)"])


def fraction_section(results: dict[str, Any], root: Path) -> str | None:
    """Metric per (encoding, training fraction) over seeds: table and line plot (absent without fractions)."""
    fractions = sorted({r.get("fraction", 1.0) for r in results["runs"]})
    if len(fractions) < 2:
        return None
    metric = results["metric"]
    scale, digits, unit = _scale(metric)
    records = {e: [[{"fraction": r.get("fraction", 1.0), metric: r["test"][metric]}]
                   for r in results["runs"] if r["encoding"] == e] for e in results["encodings"]}  # fmt: skip
    cis = _grouped(records, lambda r: r["fraction"], metric)
    lines = ["| encoding | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---|" + "---:|" * len(fractions)]
    lines += [f"| {e} | " + " | ".join(c[f].format(digits, scale) for f in fractions) + " |" for e, c in cis.items()]
    plots.ci_lines({"": {e: (fractions, [c[f] for f in fractions]) for e, c in cis.items()}},
                   "fraction of the training set", metric, "data-fraction ablation", root / "fractions.png",
                   chance=chance_level(results), log_x=True)  # fmt: skip
    intro = (
        f"Test {metric}{unit} when training on a seeded subset of the training set (the same subset for "
        "every encoding; smaller fractions are nested in larger ones), same step budget."
    )
    return "\n\n".join(["## Data-fraction ablation", intro, "\n".join(lines), "![data fractions](fractions.png)"])


def _settings(results: dict[str, Any]) -> str:
    config = results["base_config"]
    shared = ", ".join(f"{k}={json.dumps(config[k])}" for k in SETTINGS if k in config)
    return f"one shared setting for every encoding and seed (preset `{results['preset']}`): {shared}"


def write_report(root: str | Path, reference: str | None = None) -> Path:
    """Assemble ``report.md`` (and its plots) in the A/B folder ``root``; returns its path."""
    root = Path(root)
    path = root / "results.json"
    if not path.is_file():
        raise ValueError(f"run folder {root}: no results.json (is it a train.ab folder?)")
    results = json.loads(path.read_text())
    metric, rows = results["metric"], summarize(results, root, reference)
    scale, digits, unit = _scale(metric)
    chance = chance_level(results)
    plots.ci_bars([r["encoding"] for r in rows], {"test": [Interval(r["mean"], r["low"], r["high"],
                  len(r["values"])) for r in rows]}, metric, f"final test {metric}", root / "final.png",
                  chance)  # fmt: skip
    seeds = results["seeds"]
    per_seed = "\n".join(f"- {r['encoding']}: " + ", ".join(f"s{s} {scale * v:.{digits}f}" for s, v in
                         zip(r["seeds"], r["values"], strict=True)) for r in rows)  # fmt: skip
    head = [
        f"# A/B report: {results['task']}",
        f"- task: `{results['task']}`, data: {results['data_source']}\n- device: {results['device']} "
        f"(world size {results['world_size']}), torch {results['torch_version']}\n- training: {_settings(results)}\n"
        f"- seeds: {seeds}, wall time {results['wall_time_s']:.0f} s",
        "## Main result",
        f"Test {metric}{unit}: mean [95% bootstrap CI] over {len(seeds)} seed(s). Paired tests against the reference "
        f"`{rows[0]['reference']}`: sign-flip over seeds (with {len(seeds)} seed(s) the smallest possible p is "
        f"{2 / 2 ** len(seeds):.3g})"
        + ("; McNemar over the pooled test examples of those seeds." if metric == "accuracy" else "."),
        main_table(rows, metric, results["runs"][0]["peak_memory_kind"]),
        f"Per-seed test {metric}{unit}:\n{per_seed}",
        "![final metric](final.png)",
    ]
    if (root / "curves.png").is_file():
        head.append("![learning curves](curves.png)")
    evals = _evaluations(root, main_runs(results))
    sections = [shuffle_section(evals, root, chance), *extrapolation_sections(evals, root, chance),
                length_section(evals, root),
                fraction_section(results, root), inspect.section(root)]  # fmt: skip
    out = root / "report.md"
    out.write_text("\n\n".join(head + [s for s in sections if s]) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="A/B run folder (with results.json)")
    p.add_argument("--reference", help="encoding the paired tests compare against (default: best by mean)")
    args = p.parse_args(argv)
    path = write_report(args.run_dir, args.reference)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
