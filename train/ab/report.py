"""Markdown report of an A/B run folder: settings, main table with CIs and paired tests, evaluations, plots.

    python -m train.ab.report runs/ab-arrow-20260101-120000 [--reference rope-mixed]

Reads ``results.json`` and, per run, ``evaluation.json`` / ``test_correct.pt`` (``train.ab.evaluate``); writes
``report.md`` and its PNG plots into the folder. Sections whose evaluations are missing are left out.
Every number over seeds is the mean with a 95% percentile-bootstrap interval (``train.ab.stats.bootstrap_ci``).
Each section is computed (``*_cis``), rendered (``markdown_table``) and plotted separately. A run that
diverged is shown as diverged, never with a metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train import cli, data, torch_files
from train import run_dir as layout
from train.ab import inspect, plots
from train.ab.stats import Interval, bootstrap_ci, mcnemar_test, sign_flip_test
from train.markdown import markdown_table
from train.summaries import AbResults, AbRun

EVALUATION_FILE, CORRECT_FILE = layout.EVALUATION, layout.CORRECT  # per run folder, written by train.ab.evaluate
SETTINGS = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "eval_samples",
    "data_seed",
    "data_options",
    "model_options",
)
METRIC_FORMATS = {"accuracy": (100.0, 1, " (%)")}  # metric -> (table scale, digits, unit); others: (1, 3, "")


def metric_format(metric: str) -> tuple[float, int, str]:
    """Table scale, digits and unit of a metric (accuracy in percent)."""
    return METRIC_FORMATS.get(metric, (1.0, 3, ""))


@dataclass
class Row:
    """One encoding of the main table (main-fraction runs): per-seed values, mean and CI, cost, paired tests.

    ``delta`` is mean minus the reference's mean; ``p_seeds`` the sign-flip test over shared seeds;
    ``p_mcnemar`` the McNemar test over the pooled test examples of those seeds (classification only).
    ``diverged`` lists the seeds whose run diverged; such a row has no metric (``mean`` etc. are None).
    """

    encoding: str
    params: int
    seeds: list[int]
    values: list[float]
    mean: float | None
    low: float | None
    high: float | None
    std: float | None
    val_mean: float | None
    step_time_ms: float
    peak_memory_mb: float
    diverged: list[int] = dataclasses.field(default_factory=list)
    step_time_ratio: float = 1.0
    reference: str | None = None
    delta: float | None = None
    p_seeds: float | None = None
    p_mcnemar: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def interval(self) -> Interval | None:
        return None if self.mean is None else Interval(self.mean, self.low, self.high, len(self.values))


def chance_level(results: AbResults) -> float | None:
    """Accuracy of guessing, ``1 / num_classes`` of the runs' model (None for other metrics or unknown classes)."""
    classes = results.runs[0].model_spec.get("kwargs", {}).get("num_classes")
    return 1 / classes if results.metric == "accuracy" and classes else None


def _correct(root: Path, runs: Sequence[AbRun]) -> torch.Tensor | None:
    """Per-example test correctness of ``runs`` concatenated in seed order, or None if any is missing."""
    paths = [root / r.run_dir / layout.CORRECT for r in sorted(runs, key=lambda r: r.seed)]
    if not paths or not all(p.is_file() for p in paths):
        return None
    return torch.cat([_correctness(p) for p in paths])


def _correctness(path: Path) -> torch.Tensor:
    """One run's ``test_correct.pt``: a 1D tensor no larger than its file; ``RunFolderError`` naming it otherwise."""
    try:
        value = torch_files.load(path)
    except Exception as err:  # unpickling refusals, truncated archives, oversized tensors
        raise layout.RunFolderError(f"{path} is not a per-example correctness file: {err}".splitlines()[0]) from err
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise layout.RunFolderError(f"{path} is not a per-example correctness file (a 1D tensor)")
    return value


REFERENCE_HELP = "rope for text, axial-rope for images, else the first encoding"


def default_reference(task: str, encodings: Sequence[str]) -> str:
    """The fixed baseline the paired tests compare against: ``rope`` for text (1D), ``axial-rope`` for images and
    clips; the first encoding when the baseline is not among ``encodings``."""
    baseline = "rope" if data.is_text(task) else "axial-rope"
    return baseline if baseline in encodings else encodings[0]


def resolve_reference(task: str, encodings: Sequence[str], reference: str | None) -> str:
    """``reference`` when it is one of ``encodings`` (else ``ValueError``); None: ``default_reference``."""
    if reference is None:
        return default_reference(task, encodings)
    if reference not in encodings:
        raise ValueError(f"--reference: {reference!r} is not one of the encodings {list(encodings)}")
    return reference


def _row(encoding: str, mine: Sequence[AbRun]) -> Row:
    diverged = [r.seed for r in mine if r.diverged]
    values = [] if diverged else [r.test[r.metric] for r in mine]
    ci = bootstrap_ci(values) if values else None
    return Row(
        encoding=encoding,
        params=mine[0].params,
        seeds=[r.seed for r in mine],
        values=values,
        mean=ci and ci.mean,
        low=ci and ci.low,
        high=ci and ci.high,
        std=(statistics.stdev(values) if len(values) > 1 else 0.0) if values else None,
        val_mean=None if diverged else statistics.fmean(r.val[r.metric] for r in mine),
        step_time_ms=statistics.fmean(r.step_time_ms for r in mine),
        peak_memory_mb=max(r.peak_memory_mb for r in mine),
        diverged=diverged,
    )


def summarize(results: AbResults, root: str | Path, reference: str | None = None) -> list[Row]:
    """Per encoding (main-fraction runs): a ``Row`` with the paired tests against the reference filled in."""
    root, runs = Path(root), results.main_runs()
    rows = [_row(e, sorted((r for r in runs if r.encoding == e), key=lambda r: r.seed)) for e in results.encodings]
    ref_name = resolve_reference(results.task, results.encodings, reference)
    ref = next((r for r in rows if r.encoding == ref_name), None)
    for row in rows:
        row.step_time_ratio = row.step_time_ms / rows[0].step_time_ms
        row.reference = ref_name
        if ref is None or row.mean is None or ref.mean is None:
            continue
        row.delta = row.mean - ref.mean
        shared = sorted(set(row.seeds) & set(ref.seeds))
        if row is ref or not shared:
            continue
        if 2 <= len(shared) <= 16:  # one seed has no spread to test against
            row.p_seeds = sign_flip_test(
                *([v for s, v in zip(r.seeds, r.values, strict=True) if s in shared] for r in (row, ref))
            )
        a, b = (_correct(root, [r for r in runs if r.encoding == e.encoding and r.seed in shared]) for e in (row, ref))
        if a is not None and b is not None and len(a) == len(b):
            row.p_mcnemar = mcnemar_test(a.tolist(), b.tolist())
    return rows


def _p(value: float | None) -> str:
    """A p-value for a table: 3 significant digits; one that underflowed to 0 as ``<1e-300``."""
    if value is None:
        return "—"
    return "<1e-300" if value == 0 else f"{value:.3g}"


def _main_cells(r: Row, scale: float, digits: int) -> list[str]:
    """Metric cells of a main-table row: CI, Δ, p-values, val; a diverged row says so instead."""
    if r.mean is None:
        seeds = ", ".join(f"s{s}" for s in r.diverged)
        return [f"diverged ({seeds})", "—", "—", "—", "—"]
    delta = "ref" if r.encoding == r.reference else ("—" if r.delta is None else f"{scale * r.delta:+.{digits}f}")
    return [r.interval.format(digits, scale), delta, _p(r.p_seeds), _p(r.p_mcnemar), f"{scale * r.val_mean:.{digits}f}"]


def main_table(rows: Sequence[Row], metric: str, memory_kind: str) -> str:
    """Markdown table of ``summarize`` rows: metric mean [95% CI], Δ and p-values vs the reference, cost."""
    scale, digits, unit = metric_format(metric)
    memory = "peak GPU MiB" if memory_kind == "cuda_allocated" else "process peak RSS MiB"
    header = [
        "encoding",
        "params",
        f"test {metric}{unit} [95% CI]",
        "Δ vs ref",
        "p (seeds)",
        "p (McNemar)",
        f"val {metric}{unit}",
        "step ms",
        "x first",
        memory,
    ]
    body = [
        [
            r.encoding,
            f"{r.params:,}",
            *_main_cells(r, scale, digits),
            f"{r.step_time_ms:.1f}",
            f"{r.step_time_ratio:.2f}",
            f"{r.peak_memory_mb:.0f}",
        ]
        for r in rows
    ]
    return markdown_table(header, body, "lrrrrrrrrr")


def run_evaluations(root: Path, runs: Sequence[AbRun]) -> dict[str, list[dict[str, Any]]]:
    """Per encoding, the ``evaluation.json`` contents of its runs that have one."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        path = root / run.run_dir / layout.EVALUATION
        if path.is_file():
            found[run.encoding].append(layout.read_json(path) | {"seed": run.seed})
    return found


def per_encoding(evals: dict[str, list[dict[str, Any]]], pick: Callable[[dict[str, Any]], Any]) -> dict[str, list]:
    """``pick(evaluation)`` for each run of each encoding; empty picks and encodings left with none are dropped."""
    found = {e: [p for x in xs if (p := pick(x))] for e, xs in evals.items()}
    return {e: picks for e, picks in found.items() if picks}


def _grouped(
    records: dict[str, list[list[dict[str, Any]]]], key: Callable[[dict], Any], value: str
) -> dict[str, dict[Any, Interval]]:
    """Per series name ``encoding`` -> {key(record): CI of ``value`` over the encoding's runs}."""
    out: dict[str, dict[Any, Interval]] = {}
    for encoding, per_run in records.items():
        by_key: dict[Any, list[float]] = defaultdict(list)
        for run_records in per_run:
            for rec in run_records:
                by_key[key(rec)].append(rec[value])
        out[encoding] = {k: bootstrap_ci(v) for k, v in by_key.items()}
    return out


def _section(title: str, intro: str, table: str, image: str, alt: str) -> str:
    return "\n\n".join([f"## {title}", intro, table, f"![{alt}]({image})"])


SHUFFLE_KEYS = ("accuracy", "shuffled_accuracy", "drop")


def shuffle_section(evals: dict[str, list[dict[str, Any]]], root: Path, chance: float | None = None) -> str | None:
    """Patch-shuffle table (accuracy, shuffled accuracy, drop; mean [CI] over seeds) and its bar plot."""
    found = per_encoding(evals, lambda x: x.get("shuffle"))
    if not found:
        return None
    cis = {e: {k: bootstrap_ci([x[k] for x in xs]) for k in SHUFFLE_KEYS} for e, xs in found.items()}
    body = [[e, *(c[k].format(1, 100) for k in SHUFFLE_KEYS)] for e, c in cis.items()]
    table = markdown_table(["encoding", "accuracy (%)", "shuffled accuracy (%)", "drop (points)"], body, "lrrr")
    groups = {
        "unshuffled": [c["accuracy"] for c in cis.values()],
        "patches shuffled": [c["shuffled_accuracy"] for c in cis.values()],
    }
    plots.ci_bars(list(cis), groups, "accuracy", "patch shuffle", root / "shuffle.png", chance)
    intro = (
        "Test accuracy when each test image's patches (tubelets for clips) are permuted with a fixed "
        "seeded permutation per image; a large drop means the model uses patch positions."
    )
    return _section("Patch-shuffle diagnostic", intro, table, "shuffle.png", "patch shuffle")


EXTRAPOLATION_NOTE = (
    "Test accuracy (%) vs scale factor. `index`: patch coordinates keep their spacing (a larger grid "
    "covers a larger range); `stretch`: the larger grid is squeezed onto the trained coordinate range."
)


def _accuracy_by_seed(evaluations: list[dict[str, Any]], kind: str, mode: str, factor: float) -> dict[int, float]:
    return {
        x["seed"]: r["accuracy"]
        for x in evaluations
        for r in x.get("extrapolate", [])
        if (r["kind"], r["mode"], r["factor"]) == (kind, mode, factor)
    }


def paired_extrapolation_table(
    evals: dict[str, list[dict[str, Any]]], kind: str, reference: str, factors: Sequence[float], titles: Sequence[str]
) -> str:
    """Per encoding and coordinate mode, against ``reference`` on the seeds both have: mean difference in
    points, seeds where it is higher, and the exact sign-flip p-value over those seeds."""
    body = []
    for encoding in evals:
        if encoding == reference:
            continue
        modes = sorted({r["mode"] for x in evals[encoding] for r in x.get("extrapolate", []) if r["kind"] == kind})
        for mode in modes:
            cells = []
            for factor in factors:
                mine = _accuracy_by_seed(evals[encoding], kind, mode, factor)
                ref = _accuracy_by_seed(evals[reference], kind, mode, factor)
                seeds = sorted(mine.keys() & ref.keys())
                if not seeds:
                    cells.append("—")
                    continue
                a, b = [mine[s] for s in seeds], [ref[s] for s in seeds]
                delta = 100 * sum(x - y for x, y in zip(a, b, strict=True)) / len(seeds)
                higher = sum(x > y for x, y in zip(a, b, strict=True))
                cells.append(f"{delta:+.1f} ({higher}/{len(seeds)} higher, p {_p(sign_flip_test(a, b))})")
            body.append([encoding, mode, *cells])
    intro = (
        f"Paired with `{reference}` on the same seeds: mean difference in points, seeds where the encoding is "
        "higher, and the exact sign-flip p over seeds."
    )
    return intro + "\n\n" + markdown_table(["encoding", "coords", *titles], body, "ll" + "r" * len(factors))


def extrapolation_sections(
    evals: dict[str, list[dict[str, Any]]], root: Path, chance: float | None = None, reference: str | None = None
) -> list[str]:
    """One table and line plot per extrapolation kind ("resize" images, a dataset's own, e.g. arrow "canvas");
    with a ``reference`` encoding also a table of paired differences against it."""
    sections = []
    for kind, title in {"resize": "resized test images", **data.extrapolation_titles()}.items():
        records = per_encoding(evals, lambda x, kind=kind: [r for r in x.get("extrapolate", []) if r["kind"] == kind])
        if not records:
            continue
        sample = next(iter(records.values()))[0]
        factors = sorted({r["factor"] for r in sample})
        shape = {r["factor"]: ("x".join(map(str, r["size"])) + ("*" if r["rounded"] else "")) for r in sample}
        grid = {r["factor"]: "x".join(map(str, r["grid"])) for r in sample}
        cis = _grouped(records, lambda r: (r["mode"], r["factor"]), "accuracy")
        modes = {e: sorted({m for m, _ in by_key}) for e, by_key in cis.items()}
        body = [[e, m, *(cis[e][m, f].format(1, 100) for f in factors)] for e in cis for m in modes[e]]
        header = ["encoding", "coords", *(f"{f:g}x: {shape[f]}, grid {grid[f]}" for f in factors)]
        panels: dict[str, plots.Series] = defaultdict(dict)
        for e in cis:
            for m in modes[e]:
                panels[f"{m} coordinates"][e] = (factors, [cis[e][m, f] for f in factors])
        name = f"extrapolate_{kind}.png"
        ticks = {f: f"{f:g}x\n{grid[f]}" for f in factors}
        plots.ci_lines(
            panels,
            "scale factor (patch grid)",
            "accuracy",
            f"extrapolation: {title}",
            root / name,
            chance=chance,
            xticklabels=ticks,
        )
        rounded = any(shape[f].endswith("*") for f in factors)
        note = EXTRAPOLATION_NOTE + (" `*`: size rounded to the nearest multiple of the patch size." if rounded else "")
        table = markdown_table(header, body, "ll" + "r" * len(factors))
        if reference in records and len(records) > 1:
            table += "\n\n" + paired_extrapolation_table(evals, kind, reference, factors, header[2:])
        sections.append(_section(f"Resolution extrapolation: {title}", note, table, name, f"{kind} extrapolation"))
    return sections


def length_section(evals: dict[str, list[dict[str, Any]]], root: Path, test_tokens: int | None = None) -> str | None:
    """Bits per character vs evaluation length (multiple of the training context): table and line plot;
    ``test_tokens``: the tokens the main table's test bpc scores (to explain why its 1x value differs)."""
    records = per_encoding(evals, lambda x: x.get("length"))
    if not records:
        return None
    sample = next(iter(records.values()))[0]
    multiples, lengths = [r["multiple"] for r in sample], {r["multiple"]: r["length"] for r in sample}
    scored = {r["multiple"]: r["tokens"] for r in sample}
    cis = _grouped(records, lambda r: r["multiple"], "bpc")
    table = markdown_table(
        ["encoding", *(f"{m}x ({lengths[m]}-token windows, {scored[m]} tokens)" for m in multiples)],
        [[e, *(c[m].format(3) for m in multiples)] for e, c in cis.items()],
        "l" + "r" * len(multiples),
    )
    plots.ci_lines(
        {"": {e: (multiples, [c[m] for m in multiples]) for e, c in cis.items()}},
        "evaluation length (multiple of the training context)",
        "bpc",
        "length extrapolation",
        root / "length.png",
        xticklabels={m: f"{m}x" for m in multiples},
        log_x=True,
    )
    intro = (
        "Test bits per character (lower is better) in windows of 1x, 2x, ... the training context. Every length "
        "scores the same first test tokens, cut to whole windows of the longest length"
    )
    if test_tokens is not None and test_tokens != scored[multiples[0]]:
        intro += (
            f"; the main table's test bpc scores {test_tokens} tokens (the first `eval_samples` test tokens, in "
            f"windows of the training context), so its value differs from the 1x column here, which scores "
            f"{scored[multiples[0]]}"
        )
    intro += "."
    return _section("Length extrapolation", intro, table, "length.png", "length extrapolation")


def extension_section(evals: dict[str, list[dict[str, Any]]], root: Path) -> str | None:
    """Test-time extension (``train.ab.evaluate`` ``extension``): the metric at each length multiple (text) or canvas
    factor (images) per encoding x method, with the sign-flip p-value of each method against ``none`` over seeds;
    table and one line plot (a line per encoding x method)."""
    records = per_encoding(evals, lambda x: x.get("extension"))
    if not records:
        return None
    text = "bpc" in next(iter(records.values()))[0][0]
    size, value = ("multiple", "bpc") if text else ("factor", "accuracy")
    sizes = sorted({r[size] for runs in records.values() for run in runs for r in run})
    by_seed: dict[tuple[str, str], dict[Any, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for encoding, runs in records.items():
        for seed, run in enumerate(runs):
            for r in run:
                by_seed[encoding, r["method"]][r[size]][seed] = r[value]
    scale, digits = (1.0, 3) if text else (100.0, 1)
    rows, series = [], {}
    for (encoding, method), per_size in by_seed.items():
        cells, cis = [], []
        for s in sizes:
            values = per_size.get(s, {})
            ci = bootstrap_ci(list(values.values())) if values else None
            cis.append(ci)
            base = by_seed[encoding, "none"].get(s, {})
            seeds = sorted(values.keys() & base.keys())
            p = sign_flip_test([values[k] for k in seeds], [base[k] for k in seeds]) if method != "none" else None
            cells.append("" if ci is None else f"{ci.format(digits, scale)}" + ("" if p is None else f" (p {_p(p)})"))
        rows.append([encoding, method, *cells])
        if all(ci is not None for ci in cis):
            series[f"{encoding} {method}"] = (sizes, cis)
    label = "x context" if text else "x canvas"
    table = markdown_table(["encoding", "method", *(f"{s:g}{label}" for s in sizes)], rows, "ll" + "r" * len(sizes))
    plots.ci_lines({"": series}, "evaluation size (multiple of the training size)", value, "test-time extension",
                   root / "extension.png", xticklabels={s: f"{s:g}x" for s in sizes}, log_x=text)  # fmt: skip
    metric = "bits per character (lower is better)" if text else "accuracy (%)"
    intro = (
        f"Test {metric} with the encoding's rotation frequencies rescaled at test time (`liere.extend`; none / pi = "
        "position interpolation / ntk / yarn / dynamic NTK), mean [95% CI] over seeds; p: paired sign-flip test "
        "against `none` at the same size."
    )
    return _section("Test-time extension", intro, table, "extension.png", "test-time extension")


def fraction_section(results: AbResults, root: Path) -> str | None:
    """Metric per (encoding, training fraction) over seeds: table and line plot (absent without fractions)."""
    fractions = sorted({r.fraction for r in results.runs})
    if len(fractions) < 2:
        return None
    metric = results.metric
    scale, digits, unit = metric_format(metric)
    records = {
        e: [
            [{"fraction": r.fraction, metric: r.test[metric]}]
            for r in results.runs
            if r.encoding == e and not r.diverged
        ]
        for e in results.encodings
    }
    cis = _grouped({e: rs for e, rs in records.items() if rs}, lambda r: r["fraction"], metric)
    cell = {e: [c[f].format(digits, scale) if f in c else "diverged" for f in fractions] for e, c in cis.items()}
    table = markdown_table(
        ["encoding", *(f"{f:g}" for f in fractions)],
        [[e, *cells] for e, cells in cell.items()],
        "l" + "r" * len(fractions),
    )
    series = {e: ([f for f in fractions if f in c], [c[f] for f in fractions if f in c]) for e, c in cis.items()}
    plots.ci_lines(
        {"": series},
        "fraction of the training set",
        metric,
        "data-fraction ablation",
        root / "fractions.png",
        chance=chance_level(results),
        log_x=True,
    )
    intro = (
        f"Test {metric}{unit} when training on a seeded subset of the training set (the same subset for "
        "every encoding; smaller fractions are nested in larger ones), same step budget."
    )
    return _section("Data-fraction ablation", intro, table, "fractions.png", "data fractions")


def _settings(results: AbResults) -> str:
    config = results.base_config
    shared = ", ".join(f"{k}={json.dumps(config[k])}" for k in SETTINGS if k in config)
    return f"one shared setting for every encoding and seed (preset `{results.preset}`): {shared}"


def _machine(results: AbResults) -> str:
    threads = "" if results.threads is None else f", {results.threads} torch thread(s)"
    cpu = "" if results.cpu is None else f", CPU {results.cpu}"
    return f"- device: {results.device} (world size {results.world_size}){cpu}{threads}, torch {results.torch_version}"


def scored_counts(results: AbResults, evals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the test numbers score: ``{"test": n}`` (images, or tokens for text: the first ``eval_samples`` of the
    test split, at most all of it; a text split of T chars has T - 1 next-char targets) and, with a length
    evaluation, ``{"length": {multiple: tokens}}`` (the same tokens at every length); empty without split sizes."""
    if not results.data_sizes:
        return {}
    text, limit = results.data_unit == "chars", results.base_config.get("eval_samples", results.data_sizes["test"])
    counts: dict[str, Any] = {"test": min(results.data_sizes["test"] - text, limit)}
    length = next((e["length"] for runs in evals.values() for e in runs if e.get("length")), None)
    if length:
        counts["length"] = {str(r["multiple"]): r["tokens"] for r in length}
    return counts


def _data_line(results: AbResults, counts: dict[str, Any]) -> str:
    """The split sizes and how much of the test split the test metric scores (empty for older results)."""
    if not counts:
        return ""
    unit = "characters (one token each)" if results.data_unit == "chars" else results.data_unit
    sizes = " / ".join(f"{split} {n}" for split, n in results.data_sizes.items())
    what = "tokens, in windows of the training context" if results.data_unit == "chars" else results.data_unit
    return f"\n- splits: {sizes} {unit}; the test metric scores the first {counts['test']} test {what}"


def _per_seed(r: Row, scale: float, digits: int) -> str:
    if r.diverged:
        return "diverged in seed(s) " + ", ".join(map(str, r.diverged))
    return ", ".join(f"s{s} {scale * v:.{digits}f}" for s, v in zip(r.seeds, r.values, strict=True))


def _head(results: AbResults, rows: Sequence[Row], counts: dict[str, Any]) -> list[str]:
    """Title, settings (with the split sizes), main table and per-seed values."""
    metric, seeds = results.metric, results.seeds
    scale, digits, unit = metric_format(metric)
    per_seed = "\n".join(f"- {r.encoding}: " + _per_seed(r, scale, digits) for r in rows)
    paired = any(r.p_mcnemar is not None for r in rows)
    mcnemar = "; McNemar over the pooled test examples of those seeds." if paired else "."
    return [
        f"# A/B report: {results.task}",
        f"- task: `{results.task}`, data: {results.data_source}{_data_line(results, counts)}\n{_machine(results)}\n"
        f"- training: {_settings(results)}\n- seeds: {seeds}, wall time {results.wall_time_s:.0f} s",
        "## Main result",
        f"Test {metric}{unit}: mean [95% bootstrap CI] over {len(seeds)} seed(s). Paired tests against the reference "
        f"`{rows[0].reference}`: sign-flip over seeds (with {len(seeds)} seed(s) the smallest possible p is "
        f"{2 / 2 ** len(seeds):.3g}){mcnemar}",
        main_table(rows, metric, results.runs[0].peak_memory_kind),
        f"Per-seed test {metric}{unit}:\n{per_seed}",
    ]


def _final_plot(results: AbResults, rows: Sequence[Row], root: Path) -> str | None:
    scored = [r for r in rows if r.interval is not None]
    if not scored:
        return None
    metric = results.metric
    plots.ci_bars(
        [r.encoding for r in scored],
        {"test": [r.interval for r in scored]},
        metric,
        f"final test {metric}",
        root / layout.FINAL,
        chance_level(results),
    )
    return f"![final metric]({layout.FINAL})"


def write_report(root: str | Path, reference: str | None = None) -> Path:
    """Assemble ``report.md`` (and its plots) in the A/B folder ``root``; returns its path."""
    root = Path(root)
    results = AbResults.load(root)
    rows = summarize(results, root, reference)
    evals = run_evaluations(root, results.main_runs())
    counts = scored_counts(results, evals)
    parts = [*_head(results, rows, counts), _final_plot(results, rows, root)]
    if (root / layout.CURVES).is_file():
        parts.append(f"![learning curves]({layout.CURVES})")
    parts += [
        shuffle_section(evals, root, chance_level(results)),
        *extrapolation_sections(evals, root, chance_level(results), rows[0].reference if rows else None),
        length_section(evals, root, counts.get("test")),
        extension_section(evals, root),
        fraction_section(results, root),
        inspect.section(root),
    ]
    return layout.write_text(root / layout.REPORT, "\n\n".join(p for p in parts if p) + "\n")


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m train.ab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="A/B run folder (with results.json)")
    p.add_argument("--reference", help=f"encoding the paired tests compare against (default: {REFERENCE_HELP})")
    cli.add_common_options(p)
    args = p.parse_args(argv)
    path = write_report(args.run_dir, args.reference)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    cli.run(main)
