"""Report sections about the model and the data: layer table, own photos, feature maps, protocol."""

from __future__ import annotations

from research.report import Context, markdown_table, weights_cell
from research.report_runs import Sweep

AUDIT_ARTIFACT = "audit/audit.json"
LAYERS_ARTIFACT = "model/layers.json"
# At most this many groups of identical images are listed; the counts always cover all of them.
MAX_LISTED_GROUPS = 10


def _preferred(ctx: Context, artifact: str) -> tuple[Sweep, dict] | None:
    """Return the first sweep holding ``artifact``: full-data sweeps first, then VGG16 ones, then SVM studies."""
    order = sorted(ctx.sweeps, key=lambda s: ((s.parent.param_float("limit_per_class") or 0) > 0, s.parent.param("backbone") != "vgg16", s.classifier != "svm"))
    for sweep in order:
        data = ctx.store.artifact_json(sweep.parent.run_id, artifact)
        if data is not None:
            return sweep, data
    return None


def layers_section(ctx: Context) -> list[str]:
    t = ctx.text
    found = _preferred(ctx, LAYERS_ARTIFACT)
    if found is None:
        return [f"## {t('h_layers', model='VGG16')}", ""] + ctx.missing("layers_missing")
    sweep, table = found
    # The lab's own spelling for VGG models (VGG16); other timm names are shown as they are.
    shown = table["model"].upper() if table["model"].startswith("vgg") else f"`{table['model']}`"
    lines = [f"## {t('h_layers', model=shown)}", ""]
    lines += [t("layers_intro", model=table["model"], size=table["image_size"], run=sweep.parent.run_id), ""]

    rows = []
    for row in table["rows"]:
        rows.append([
            f"`{row['name']}`", row["type"], t.integer(row["in_channels"]) if row["in_channels"] else "",
            t.integer(row["out_channels"]) if row["out_channels"] else "", row["kernel"], t.integer(row["weights"]),
            t.integer(row["biases"]), "×".join(str(s) for s in row["output_size"]),
        ])
    totals = table["totals"]
    rows.append([t("total_row"), "", "", "", "", f"**{t.integer(totals['weights'])}**", f"**{t.integer(totals['biases'])}**", ""])
    headers = [t("col_layer"), t("col_type"), t("col_in"), t("col_out"), t("col_kernel"), t("col_weights_count"), t("col_biases"), t("col_output_size")]
    lines += markdown_table(headers, rows, right={2, 3, 5, 6})
    lines += ["", t("layers_total", weights=t.integer(totals["weights"]), biases=t.integer(totals["biases"]), parameters=t.integer(totals["parameters"]), layers=totals["layers"])]
    n = table.get("num_classes", 0)
    if n:
        lines += ["", t("layers_outputs_imagenet" if n == 1000 else "layers_outputs_other", n=t.integer(n))]
    return lines + ctx.sources([sweep.parent])


def _command_artifacts(ctx: Context, command: str, artifact: str) -> list[tuple]:
    """Return (run, parsed JSON artifact) for each finished run of a ``research`` command that has the artifact."""
    pairs = [(run, ctx.store.artifact_json(run.run_id, artifact)) for run in ctx.store.command_runs(command)]
    return [(run, data) for run, data in pairs if data]


def predict_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_predict')}", ""]
    if not ctx.store.command_runs("predict"):
        return lines + ctx.missing("predict_missing")
    for run, data in _command_artifacts(ctx, "predict", "predict/predictions.json"):
        lines += [t("predict_intro", model=data["backbone"], weights=data["weights"]), ""]
        rows = []
        for record in data["images"]:
            stem = record["figure"].removesuffix(".png")
            image = ctx.artifact_figure(run.run_id, f"predict/{ctx.lang}/{record['figure']}", f"predict-{run.run_id[:8]}-{stem}", record["image"])
            if image:
                lines += [image, ""]
            top = record["top"][0]
            rows.append([f"`{record['image']}`", top["label"], t.percent(top["probability"], 1), weights_cell(run, t)])
        headers = [t("col_image"), t("col_class"), t("col_probability"), t("col_weights")]
        lines += markdown_table(headers, rows, right={2}) + ctx.sources([run]) + [""]
    return lines


def featuremaps_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_featuremaps')}", ""]
    if not ctx.store.command_runs("featuremaps"):
        return lines + ctx.missing("featuremaps_missing")
    for run, data in _command_artifacts(ctx, "featuremaps", "featuremaps/featuremaps.json"):
        if not data["images"]:
            continue
        first = data["images"][0]
        quantile = t.number(data["quantile"], 2)
        lines += [t("featuremaps_intro", n=first["n_maps"], layer=first["layer"], model=data["backbone"], weights=data["weights"], quantile=quantile), ""]
        if run.weights_random:
            lines += [f"⚠ {t('random_note', runs=f'`{run.run_id[:8]}`')}", ""]
        for record in data["images"]:
            lines += [f"### `{record['image']}`", ""]
            for kind in ("maps", "threshold"):
                name = f"{record['stem']}-{kind}"
                image = ctx.artifact_figure(run.run_id, f"featuremaps/{ctx.lang}/{name}.png", f"featuremaps-{run.run_id[:8]}-{name}", f"{record['image']} {kind}")
                if image:
                    lines += [image, ""]
            lines += [t("featuremaps_most_active", maps=", ".join(str(i) for i in record["most_active"])), ""]
        lines += ctx.sources([run])[1:] + [""]
    return lines


def protocol_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_protocol')}", ""]
    found = _preferred(ctx, AUDIT_ARTIFACT)
    if found is None:
        return lines + ctx.missing("protocol_missing")
    sweep, audit = found
    parent = sweep.parent
    sizes = ", ".join(f"{size} ({t.integer(n)})" for size, n in audit["sizes"].items())
    modes = ", ".join(f"{mode} ({t.integer(n)})" for mode, n in audit["modes"].items())
    lines += [t("protocol_intro", run=parent.run_id, root=audit["root"], layout=audit["layout"], classes=len(audit["classes"]), images=t.integer(audit["n_images"]), sizes=sizes, modes=modes), ""]

    limit = int(parent.param_float("limit_per_class") or 0)
    limit_text = t("protocol_limit", n=limit) if limit else t("protocol_limit_none")
    val_fraction = parent.param_float("val_fraction")
    lines += [t(
        "protocol_splits", n_train=t.integer(parent.metrics.get("n_train", 0)), n_val=t.integer(parent.metrics.get("n_val", 0)),
        n_test=t.integer(parent.metrics.get("n_test", 0)), val_fraction=t.percent(val_fraction, 0) if val_fraction is not None else "?",
        seed=parent.param("seed"), limit=limit_text,
    ), ""]
    seeds = parent.param_float("seeds")
    if seeds:
        key = "protocol_seeds" if int(seeds) > 1 else "protocol_one_seed"
        lines += [t(key, n=int(seeds), seed=parent.param("seed")), ""]
    lines += [t(
        "protocol_duplicates", within=len(audit["duplicates_within"]), across=len(audit["duplicates_across"]), skipped=len(audit["skipped_files"]),
    ), ""]
    if audit["duplicates_across"]:
        lines += [t("protocol_leak_list"), ""]
        lines += [f"- {', '.join(f'`{p}`' for p in group)}" for group in audit["duplicates_across"][:MAX_LISTED_GROUPS]]
        if len(audit["duplicates_across"]) > MAX_LISTED_GROUPS:
            lines.append(f"- … (+{len(audit['duplicates_across']) - MAX_LISTED_GROUPS})")
        lines.append("")
    lines += [t("protocol_weights", backbone=parent.param("backbone"), weights=parent.param("weights"), size=parent.param("image_size")), ""]

    splits = ("train", "val", "test")
    rows = [[name] + [t.integer(audit["counts"][split][name]) for split in splits] for name in audit["classes"]]
    rows.append([t("total_row")] + [f"**{t.integer(sum(audit['counts'][split].values()))}**" for split in splits])
    headers = [t("col_class_scene"), t("col_train"), t("col_val"), t("col_test_split")]
    return lines + markdown_table(headers, rows, right={1, 2, 3}) + ctx.sources([parent])
