"""Evaluation reports: results.json, a Markdown table, a PNG chart, the wrong answers, and run comparison.

One scoring run writes, into its output folder:

``results.json``        everything needed to compare runs later: task, inputs, counts (questions, missing and
                        unexpected predictions, skipped records), bootstrap settings, every :class:`Row`, and
                        the compatibility table as the reference script would print it, with the reference
                        (repository, script, commit) and each line's n and excluded count; with the
                        ``medmax`` family, the MedMax table (accuracies with MedMax's standard error, and
                        the counts of unparsed judge verdicts and of open answers not judged).
``results.md``          the same rows as a Markdown table (task, family, answer type, group, metric, n, value,
                        95% CI), then the compatibility table with the script and commit it reproduces and
                        each figure's n (the items averaged) and excluded items, then the MedMax table.
                        With the ``vlmevalkit`` family, ``mcq_routes``: how many multiple-choice answers each
                        matching route decided (letter, option text, judge, miss), also a section of results.md.
``results.png``         headline metrics per family and answer type with their intervals (matplotlib, Agg).
``wrong_answers.jsonl`` each question some family counts wrong on its headline metric, with the prediction,
                        the ground truth and every family's per-item figures.
``judge.jsonl``         the judge's prompts, replies and verdicts, when a judge was used.

Values are percentages. :func:`compare` lines two ``results.json`` up by (task, family, answer type, group,
metric) and says whether the two 95% intervals overlap (a quick, conservative check, not a test).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from medtune.data.jsonl import atomic_open, write_json
from medtune.eval.medmax import MedmaxTable
from medtune.eval.metrics import CompatTable, Item, Row, is_headline, is_wrong
from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED

RESULTS_FILE, MARKDOWN_FILE, CHART_FILE = "results.json", "results.md", "results.png"
WRONG_FILE, JUDGE_FILE = "wrong_answers.jsonl", "judge.jsonl"


def write_report(out_dir: str | os.PathLike, *, rows: list[Row], items: list[Item], scores: dict[str, dict],
                 info: dict, compat_table: CompatTable | None = None, medmax_table: MedmaxTable | None = None,
                 judge_records: list[dict] | None = None, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED, mcq_routes: dict[str, int] | None = None,
                 probmed_table=None) -> dict[str, Path]:
    """Write every report file into ``out_dir`` (each atomically); returns their paths by kind."""
    out = Path(out_dir)
    results = {**info, "bootstrap": {"method": "percentile", "resamples": resamples, "seed": seed, "level": 0.95},
               "rows": [row.to_dict() for row in rows]}
    if compat_table is not None:
        results["compat_table"] = compat_table.to_dict()
    if medmax_table is not None:
        results["medmax_table"] = medmax_table.to_dict()
    if mcq_routes is not None:
        results["mcq_routes"] = mcq_routes
    if probmed_table is not None:
        results["probmed_table"] = probmed_table.to_dict()
    paths = {"results": out / RESULTS_FILE, "markdown": out / MARKDOWN_FILE, "chart": out / CHART_FILE,
             "wrong": out / WRONG_FILE}
    write_json(paths["results"], results)
    with atomic_open(paths["markdown"]) as handle:
        handle.write(markdown(rows, title=f"medtune eval: {info.get('task', {}).get('name', '?')}",
                              compat=compat_table, medmax=medmax_table, scope=scope_line(info.get("counts", {})),
                              mcq_routes=mcq_routes, probmed=probmed_table))
    write_chart(paths["chart"], rows)
    paths["wrong"] = write_wrong_answers(paths["wrong"], items, scores)
    if judge_records:
        paths["judge"] = out / JUDGE_FILE
        _write_jsonl(paths["judge"], judge_records)
    return paths


def format_ci(row: Row) -> str:
    return f"[{row.estimate.low:.2f}, {row.estimate.high:.2f}]"


def scope_line(counts: dict) -> str | None:
    """What was scored when it is not the whole task: a limited run's file covers its first N questions."""
    limit, total = counts.get("limit"), counts.get("task_questions")
    if limit is None or total is None or limit >= total:
        return None
    return f"scored {counts['questions']} of {total} questions (the run was limited to {limit})"


def markdown(rows: list[Row], *, title: str = "medtune eval", compat: CompatTable | None = None,
             medmax: MedmaxTable | None = None, scope: str | None = None,
             mcq_routes: dict[str, int] | None = None, probmed=None) -> str:
    lines = [f"# {title}", "", *([scope.capitalize() + ".", ""] if scope else []),
             "| task | family | answer type | group | metric | n | value | 95% CI |",
             "| --- | --- | --- | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        group = "all" if row.group_by == "all" else f"{row.group_by}: {row.group}"
        n = f"{row.estimate.n}" + (f" ({row.excluded} excluded)" if row.excluded else "")
        lines.append(f"| {row.task} | {row.family} | {row.answer_type} | {group} | {row.metric} | {n} | "
                     f"{row.estimate.value:.2f} | {format_ci(row)} |")
    if compat is not None:
        lines += ["", *_compat_section(compat)]
    if medmax is not None:
        lines += ["", *_medmax_section(medmax)]
    if mcq_routes is not None:
        lines += ["", *_routes_section(mcq_routes)]
    if probmed is not None:
        lines += ["", "## ProbMed's table", "", "```", probmed.render(), "```"]
    return "\n".join(lines) + "\n"


def _routes_section(routes: dict[str, int]) -> list[str]:
    """How the vlmevalkit family read each multiple-choice answer (see medtune.eval.mcq)."""
    from medtune.eval.mcq import REFERENCE
    lines = ["## Multiple-choice answers by matching route", "",
             (f"VLMEvalKit's rule ({REFERENCE}): the option letter as a word, else a refusal or a lone Z "
              "(refused: a miss), else one option's text, else the judge (only with a judge endpoint), else a "
              "miss."), "", "| route | answers |", "| --- | ---: |"]
    lines += [f"| {route} | {n} |" for route, n in routes.items()]
    return lines


def _compat_section(compat: CompatTable) -> list[str]:
    """The reference script's table as it prints it, with the script, its commit and each figure's n."""
    reference = compat.reference
    lines = [f"## Compatibility table ({compat.flavour} script labels, as it prints them)", "",
             f"Reproduces `{reference.script}` of {reference.repository} at commit `{reference.commit}` "
             f"({reference.release})" + (f"; {reference.note}" if reference.note else "") + ".",
             f"Note: {compat.exact_match_note}.", "",
             "| metric | value | n |", "| --- | ---: | ---: |"]
    for line in compat.lines:
        n = f"{line.n}" + (f" ({line.excluded} excluded)" if line.excluded else "")
        lines.append(f"| {line.label} | {line.to_dict()['printed']} | {n} |")
    return lines


def _medmax_section(table: MedmaxTable) -> list[str]:
    """MedMax's figures (with its standard error) and the counts behind them; a count line has its count
    under n and no value."""
    lines = ["## MedMax table", "",
             f"MedMax's rules ({table.to_dict()['reference']}). The MedMax-reported open accuracy leaves "
             "unparsed verdicts out, as that script does; medtune's counts them as wrong. Values and standard "
             "errors are percentages.", "",
             "| figure | value | std err | n |", "| --- | ---: | ---: | ---: |"]
    for line in table.lines:
        value = "" if line.is_count else f"{line.value:.2f}"
        stderr = f"{line.stderr:.2f}" if line.stderr is not None else ""
        lines.append(f"| {line.label} | {value} | {stderr} | {line.n} |")
    return lines


def chart(rows: list[Row]):
    """Bar chart of each family's headline metric per answer type, with 95% intervals as error bars and each
    bar's value above it (a 0.0 bar has no height to see; an undefined figure reads "n/a")."""
    import logging
    import math

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter is not the user's concern
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.group_by == "all" and is_headline(r)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(shown) + 2), 3.6))
    labels = [f"{r.family}\n{r.answer_type} {r.metric}" for r in shown]
    defined = [not math.isnan(r.estimate.value) for r in shown]
    values = [r.estimate.value if ok else 0.0 for r, ok in zip(shown, defined)]
    errors = [[r.estimate.value - r.estimate.low if ok else 0.0 for r, ok in zip(shown, defined)],
              [r.estimate.high - r.estimate.value if ok else 0.0 for r, ok in zip(shown, defined)]]
    bars = ax.bar(range(len(shown)), values, yerr=errors, capsize=4, color="#4C72B0")
    for bar, row, ok, top in zip(bars, shown, defined, (v + e for v, e in zip(values, errors[1]))):
        ax.annotate(f"{row.estimate.value:.1f}" if ok else "n/a", (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylim(0, 108)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_title(", ".join(sorted({r.task for r in shown})) or "no rows")
    fig.tight_layout()
    return fig


def write_chart(path: Path, rows: list[Row]) -> Path:
    import matplotlib.pyplot as plt

    fig = chart(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path


def write_wrong_answers(path: Path, items: list[Item], scores: dict[str, dict]) -> Path:
    records = []
    for item in items:
        wrong_in = [family for family, per_item in scores.items() if is_wrong(family, item, per_item.get(item.id, {}))]
        if wrong_in:
            records.append({**item.to_dict(), "wrong_in": wrong_in,
                            "scores": {family: per_item.get(item.id, {}) for family, per_item in scores.items()}})
    _write_jsonl(path, records)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_rows(results_path: str | os.PathLike) -> list[Row]:
    path = Path(results_path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (pass a results file or the folder of a scoring run)")
    with open(path, encoding="utf-8") as handle:
        return [Row.from_dict(row) for row in json.load(handle)["rows"]]


def compare(a_path: str | os.PathLike, b_path: str | os.PathLike, *, all_groups: bool = False) -> str:
    """Two runs side by side: A, B, B − A, and whether their 95% intervals overlap."""
    a_rows = {r.key: r for r in load_rows(a_path) if all_groups or r.group_by == "all"}
    b_rows = {r.key: r for r in load_rows(b_path) if all_groups or r.group_by == "all"}
    keys = list(a_rows) + [k for k in b_rows if k not in a_rows]
    header = ["task", "family", "type", "group", "metric", "A", "B", "B-A", "CIs overlap"]
    table = [header]
    for key in keys:
        a, b = a_rows.get(key), b_rows.get(key)
        task, family, answer_type, group_by, group, metric = key
        cells = [task, family, answer_type, group if group_by == "all" else f"{group_by}={group}", metric,
                 _cell(a), _cell(b)]
        if a and b:
            cells += [f"{b.estimate.value - a.estimate.value:+.2f}", "yes" if a.estimate.overlaps(b.estimate) else "NO"]
        else:
            cells += ["-", "-"]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    return f"{row.estimate.value:.2f} {format_ci(row)} n={row.estimate.n}"
