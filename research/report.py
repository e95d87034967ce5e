"""The markdown report, generated from the runs of one MLflow experiment alone.

``write_report`` reads runs, params, metrics, tags and artifacts (no model runs, no data is read)
and writes ``report.md`` (English) or ``report.fr.md`` (French) with its figures under
``figures/``. Sections follow the lab's order: the model's layers, own photos, first-convolution
maps, protocol, SVM, FC width, pooling, Optuna studies, environment. A section whose runs do not
exist yet states it instead of failing. The same runs give byte-identical files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from research.plots import save_png
from research.report_runs import RunRecord, RunStore, Sweep, best_trial, experiment_names
from research.report_text import Text

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
REPORT_FILES = {"en": "report.md", "fr": "report.fr.md"}


@dataclass
class Context:
    """Inputs of every section: the runs, the language and the output folder."""

    store: RunStore
    sweeps: list[Sweep]
    text: Text
    out_dir: Path
    figures: list[str] = field(default_factory=list)

    @property
    def lang(self) -> str:
        return self.text.lang

    def figure(self, figure: Figure, name: str, alt: str) -> str:
        """Save a figure under ``figures/`` and return its markdown image line."""
        relative = f"{FIGURES_DIR}/{name}.{self.lang}.png"
        save_png(figure, self.out_dir / relative)
        self.figures.append(relative)
        return f"![{alt}]({relative})"

    def artifact_figure(self, run_id: str, artifact: str, name: str, alt: str) -> str | None:
        """Copy a PNG artifact of a run under ``figures/`` and return its markdown image line."""
        local = self.store.artifact_path(run_id, artifact)
        if local is None:
            return None
        relative = f"{FIGURES_DIR}/{name}.{self.lang}.png"
        (self.out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, self.out_dir / relative)
        self.figures.append(relative)
        return f"![{alt}]({relative})"

    def sources(self, runs: list[RunRecord]) -> list[str]:
        """Return the line naming a table's source runs, and a warning line when any has random weights."""
        ids = sorted({run.run_id for run in runs})
        shown = ", ".join(f"`{run_id}`" for run_id in ids[:12])
        if len(ids) > 12:
            shown += f" (+{len(ids) - 12})"
        lines = ["", self.text("source", runs=shown or "-")]
        random_ids = sorted({run.run_id[:8] for run in runs if run.weights_random})
        if random_ids:
            lines += ["", self.text("random_note", runs=", ".join(f"`{run_id}`" for run_id in random_ids[:6]))]
        return lines

    def missing(self, key: str) -> list[str]:
        return [f"_{self.text('no_runs', what=self.text(key))}_"]


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Format a markdown table; columns in ``right`` are right-aligned."""
    right = right or set()
    align = ["---:" if index in right else "---" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def weights_cell(run: RunRecord, text: Text) -> str:
    """Show a run's weights label, marked when they are random."""
    label = run.param("weights")
    return f"**{text('random_mark')}** ⚠" if run.weights_random else f"`{label}`"


def format_params(params: dict[str, str], text: Text) -> str:
    """Format trial params as ``name=value`` pairs, numbers in the report's language."""
    shown = []
    for name in sorted(params):
        value = params[name]
        try:
            number = float(value)
            value = text.scientific(number, 4) if not number.is_integer() else str(int(number))
        except ValueError:
            pass
        shown.append(f"`{name}`={value}")
    return ", ".join(shown)


def _header(ctx: Context) -> list[str]:
    backbones = sorted({sweep.parent.param("backbone") for sweep in ctx.sweeps})
    lines = [f"# {ctx.text('title', backbone=', '.join(backbones))}", ""]
    experiments = ", ".join(f"`{name}`" for name in experiment_names(ctx.store.experiment))
    lines.append(ctx.text("intro", experiment=experiments, n_sweeps=len(ctx.sweeps)))
    random_runs = [sweep.parent for sweep in ctx.sweeps if sweep.weights_random]
    random_runs += [run for command in ("predict", "featuremaps") for run in ctx.store.command_runs(command) if run.weights_random]
    if random_runs:
        shown = ", ".join(f"`{run.run_id[:8]}` ({run.params.get('study') or run.tags.get('research.command', '')})" for run in random_runs)
        lines += ["", f"> ⚠ {ctx.text('random_banner', runs=shown)}"]

    t = ctx.text
    rows = []
    for sweep in ctx.sweeps:
        best = best_trial(sweep)
        best_val = sweep.parent.metrics.get("best_val_accuracy", best.metrics.get("val_accuracy") if best else None)
        rows.append([
            f"`{sweep.study}`", f"`{sweep.study_name}`", f"`{sweep.parent.param('backbone')}`", weights_cell(sweep.parent, t),
            str(len(sweep.trials)), t.percent(best_val), t.percent(sweep.parent.metrics.get("test_accuracy")), f"`{sweep.parent.run_id}`",
        ])
    headers = [t("col_study"), t("col_optuna_study"), t("col_backbone"), t("col_weights"), t("col_trials"), t("col_best_val"), t("col_test"), t("col_run")]
    lines += ["", f"## {t('h_overview')}", ""] + markdown_table(headers, rows, right={4, 5, 6})
    lines += ctx.sources([sweep.parent for sweep in ctx.sweeps])
    return lines


def build_report(store: RunStore, lang: str, out_dir: Path) -> tuple[str, list[str]]:
    """Build the report's markdown and write its figures; return the text and the figure paths."""
    # Imported here because the section modules import Context and the table helpers from this one.
    from research import report_sections, report_studies

    ctx = Context(store, store.sweeps(), Text(lang), out_dir)
    sections = [
        _header,
        report_sections.layers_section,
        report_sections.predict_section,
        report_sections.featuremaps_section,
        report_sections.protocol_section,
        report_studies.svm_section,
        report_studies.fc_width_section,
        report_studies.pooling_section,
        report_studies.optuna_section,
        report_studies.environment_section,
    ]
    lines: list[str] = []
    for section in sections:
        lines += section(ctx) + [""]
    return "\n".join(lines).rstrip() + "\n", ctx.figures


def write_report(experiment: str, out: str | Path | None = None, lang: str = "en", client: MlflowClient | None = None) -> Path:
    """Write the report of an MLflow experiment and return the markdown file's path.

    Args:
        experiment: MLflow experiment name, or several separated by commas.
        out: Output folder; ``reports/<experiment>`` by default (names joined by ``+``).
        lang: ``en`` or ``fr``.
        client: MLflow client; one for the current tracking URI by default.

    Raises:
        ReportError: The experiment does not exist or has no finished sweep.
        ValueError: ``lang`` is not supported.
    """
    text = Text(lang)
    out_dir = Path(out) if out else Path("reports") / "+".join(experiment_names(experiment))
    store = RunStore(client or MlflowClient(), experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The report is built in a temporary sibling folder and moved into place only once it is
    # complete, so a failed run leaves an earlier report and its figures untouched.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as staging:
        try:
            markdown, figures = build_report(store, lang, Path(staging))
        finally:
            store.close()
        path = out_dir / REPORT_FILES[lang]
        _replace_figures(Path(staging) / FIGURES_DIR, out_dir / FIGURES_DIR, _report_figures(path))

    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(markdown, encoding="utf-8")
    os.replace(partial, path)
    log.info("Wrote %s with %d figures.", path, len(figures))
    return path


def _report_figures(path: Path) -> set[str]:
    """Return the file names of the figures that an existing report links to, none if there is no report."""
    if not path.is_file():
        return set()
    links = re.findall(rf"\]\({FIGURES_DIR}/([^)/]+\.png)\)", path.read_text(encoding="utf-8"))
    return set(links)


def _replace_figures(new_dir: Path, figures_dir: Path, earlier: set[str]) -> None:
    """Move the new figures into ``figures_dir`` and remove the earlier report's figures that the new one dropped.

    Only figures that the earlier report links to are removed, so other files in the folder stay.
    """
    figures_dir.mkdir(parents=True, exist_ok=True)
    new_names = {figure.name for figure in new_dir.iterdir()} if new_dir.is_dir() else set()
    dropped = sorted(name for name in earlier - new_names if (figures_dir / name).is_file())
    if dropped:
        log.warning(
            "Replacing the report in %s: removing %d figure(s) of the earlier report, from runs this report does not read "
            "(%s%s). Pass --out to keep the earlier report.",
            figures_dir.parent, len(dropped), ", ".join(dropped[:3]), ", ..." if len(dropped) > 3 else "",
        )
    for name in dropped:
        (figures_dir / name).unlink()
    for figure in sorted(new_dir.iterdir()) if new_dir.is_dir() else []:
        os.replace(figure, figures_dir / figure.name)
