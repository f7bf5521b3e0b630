"""The ``compare`` stage: the cross-domain table, the map of the domains and the report page.

Rows are adaptation methods, columns the source domains' out-of-fold score (in domain) and each
test domain's end-to-end score (across the domain gap), each with its 95 % interval. Everything
is read from the metrics files the other stages wrote, so ``dvc repro`` rebuilds it and
``dvc metrics diff`` shows how a change moved each cell. The report (``reports/README.md``)
links only files the pipeline writes; a test checks every link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hemaflow._io import write_csv, write_figure, write_json, write_text
from hemaflow.classify.adapt import choose_method, costing_the_source
from hemaflow.data.classes import load_class_matrix
from hemaflow.errors import HemaflowError
from hemaflow.metrics import bootstrap_interval, label_scores
from hemaflow.params import EvaluateParams
from hemaflow.translate.domain import domain_map

__all__ = ["against_baseline", "compare"]

IN_DOMAIN = "source (out-of-fold)"


def _read(path: Path) -> dict:
    if not path.exists():
        raise HemaflowError(f"{path}: missing; run `dvc repro` for the stage that writes it")
    return json.loads(path.read_text())


def against_baseline(
    method: pd.DataFrame, baseline: pd.DataFrame, evaluation: EvaluateParams, seed: int, coarse: bool = True
) -> dict[str, float | list[float]]:
    """A method's macro-F1 (over coarse groups, or fine classes) minus the baseline's on the same cells
    (``cell_id``, ``image``, ``fine_class``, ``predicted``: evaluate's tables, or the out-of-fold
    source cells), with a paired bootstrap interval: each resample draws images once and scores both
    methods on them, so the image-to-image variation both share cancels (two separate intervals
    overlap long before a difference is in doubt)."""
    paired = method.merge(baseline, on=["cell_id", "image", "fine_class"], suffixes=("", "_baseline"))
    paired = paired[paired["fine_class"] != ""]
    labels = load_class_matrix().coarse if coarse else list
    columns = [pd.Series(labels(paired[c])) for c in ("fine_class", "predicted", "predicted_baseline")]
    codes = {label: i for i, label in enumerate(sorted(set().union(*columns)))}
    truth, chosen, base = (c.map(codes).to_numpy() for c in columns)

    def gain(rows: np.ndarray) -> float:
        return label_scores(truth[rows], chosen[rows])["macro_f1"] - label_scores(truth[rows], base[rows])["macro_f1"]

    interval = bootstrap_interval(gain, paired["image"].to_numpy(), evaluation.bootstrap, evaluation.confidence, seed)
    return {"difference": gain(np.arange(len(paired))), "interval": list(interval), "cells": len(paired)}


def _table(methods: Sequence[str], metrics: Path, trained: dict[str, dict]) -> pd.DataFrame:
    """One row per (method, column): macro-F1 (fine), its interval, and the coarse macro-F1."""
    rows = []
    for method in methods:
        oof = trained[method]["oof"]
        rows.append(
            {
                "method": method,
                "domain": IN_DOMAIN,
                "macro_f1": oof["macro_f1"],
                "low": None,
                "high": None,
                "coarse_macro_f1": None,
            }
        )
        for domain, scores in sorted(_read(metrics / "evaluate" / f"{method}.json").get("domains", {}).items()):
            low, high = scores["macro_f1_interval"]
            rows.append(
                {
                    "method": method,
                    "domain": f"{domain} (test)",
                    "macro_f1": scores["macro_f1"],
                    "low": low,
                    "high": high,
                    "coarse_macro_f1": scores["coarse_macro_f1"],
                }
            )
    return pd.DataFrame(rows)


def _cell(value: float, low: float | None, high: float | None) -> str:
    return f"{value:.4f}" if low is None or pd.isna(low) else f"{value:.4f} [{low:.4f}, {high:.4f}]"


def _spread_cell(spread: dict) -> str:
    """Mean ± standard deviation across training seeds, or the one seed's value."""
    count = len(spread["per_seed"])
    if spread["std"] is None:
        return f"{spread['mean']:.4f} (1 seed)"
    return f"{spread['mean']:.4f} ± {spread['std']:.4f} ({count} seeds)"


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(frame.columns))) + "|"
    body = [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def _bars(table: pd.DataFrame, path: Path) -> None:
    """macro-F1 per method and domain with 95 % intervals as error bars."""
    domains = list(dict.fromkeys(table["domain"]))
    methods = list(dict.fromkeys(table["method"]))
    figure = Figure(figsize=(2.5 + 1.4 * len(methods) * len(domains) / 2, 4.2))
    ax = figure.subplots()
    width = 0.8 / len(domains)
    for k, domain in enumerate(domains):
        part = table[table["domain"] == domain].set_index("method").reindex(methods)
        x = [i + k * width for i in range(len(methods))]
        errors = [(part["macro_f1"] - part["low"]).fillna(0), (part["high"] - part["macro_f1"]).fillna(0)]
        ax.bar(x, part["macro_f1"], width, yerr=errors, capsize=3, label=domain)
    ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(methods))], methods, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("macro-F1 (fine classes)")
    ax.set_title("Adaptation methods across domains (bars: 95 % bootstrap interval over test images)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    write_figure(path, figure)


def compare(
    *,
    methods: Sequence[str],
    deployed: str,
    source_tolerance: float,
    translations: Sequence[str],
    metrics: Path,
    evaluated: Path,
    classifiers: Path,
    evaluation: EvaluateParams,
    seed: int,
    prepared: Path,
    translated: Path,
    out: Path,
    plots: Path,
    translate_plots: Path,
    report: Path,
) -> None:
    """Write ``out`` (the cross-domain table), its plots, the map of the domains and ``report``.

    ``deployed`` names the method ``hemaflow predict`` uses, or is ``auto``: then it is chosen from
    the classifiers' selection scores (metrics/classify) and their out-of-fold source cells, never
    from the test split. Each method is also set against ``none`` on the same test cells
    (``evaluated``: evaluate's per-cell tables) and on the same out-of-fold source cells
    (``classifiers``: train_classifier's folders, <method>/oof.csv)."""
    trained = {m: _read(metrics / "classify" / f"{m}.json") for m in methods}
    table = _table(methods, metrics, trained)
    selection = {m: trained[m]["selection"] for m in methods}
    images = pd.read_csv(prepared / "cells.csv", usecols=["cell_id", "image"], keep_default_na=False)
    source_baseline = _read_oof(classifiers, "none", images) if "none" in methods else None
    source_costs = {
        m: against_baseline(_read_oof(classifiers, m, images), source_baseline, evaluation, seed, coarse=False)
        for m in methods
        if m != "none" and source_baseline is not None
    }
    if deployed == "auto":
        deployed, because = choose_method(selection, costing_the_source(source_costs, source_tolerance))
    else:
        because = "set in adapt.deploy"
    evaluations = {m: _read(metrics / "evaluate" / f"{m}.json") for m in methods}
    # the headline across labs: macro-F1 over coarse groups, where the domains' fine classes differ
    scored = {m: e["overall"]["coarse_macro_f1"] for m, e in evaluations.items() if e.get("status") != "none"}
    baseline = _read_evaluated(evaluated, "none") if "none" in scored else None
    gains = {
        m: against_baseline(_read_evaluated(evaluated, m), baseline, evaluation, seed)
        for m in methods
        if m != "none" and m in scored and baseline is not None
    }
    result = {
        "deployed_method": deployed,
        "deployed_because": because,
        "selection": selection,
        # reported, never used to choose: did the choice without test labels find the test's best?
        "best_on_test": max(scored, key=scored.get) if scored else None,
        "macro_f1": {m: {r.domain: r.macro_f1 for r in table[table["method"] == m].itertuples()} for m in methods},
        "macro_f1_interval": {
            m: {
                r.domain: [r.low, r.high]
                for r in table[table["method"] == m].itertuples()
                if r.low is not None and not pd.isna(r.low)
            }
            for m in methods
        },
        # paired over the same test images: the honest answer to "does this method beat none?"
        "coarse_macro_f1_minus_none": gains,
        # the same on the labelled source cells, out of fold and fine: what a method costs in domain
        "oof_macro_f1_minus_none": source_costs,
        "cytologia_score": {m: e.get("overall", {}).get("cytologia", {}).get("score") for m, e in evaluations.items()},
        "macro_f1_across_seeds": {
            m: {f"{d} (test)": {k: v[k] for k in ("mean", "std")} for d, v in _test_spread(e).items()}
            for m, e in evaluations.items()
        },
    }
    write_json(out, result)
    write_csv(plots / "macro_f1.csv", table.assign(cell=table["method"] + " @ " + table["domain"]).round(4))
    _bars(table, plots / "macro_f1.png")
    domain_map(
        prepared=prepared,
        translated=translated,
        translations=translations,
        csv=translate_plots / "domains.csv",
        png=translate_plots / "domains.png",
    )
    write_text(
        report,
        _report(methods, result, translations, table, evaluations, metrics, report, plots, translate_plots),
    )


def _read_predictions(path: Path, stage: str) -> pd.DataFrame:
    """Per-cell predictions (``cell_id``, ``fine_class``, ``predicted``, and ``image`` where the file has it)."""
    if not path.exists():
        raise HemaflowError(f"{path}: missing; run `dvc repro {stage}`")
    columns = {"cell_id", "image", "fine_class", "predicted"}
    return pd.read_csv(path, keep_default_na=False, usecols=lambda c: c in columns)


def _read_evaluated(folder: Path, method: str) -> pd.DataFrame:
    return _read_predictions(folder / f"{method}.csv", f"evaluate@{method}")


def _read_oof(folder: Path, method: str, images: pd.DataFrame) -> pd.DataFrame:
    """A method's out-of-fold source predictions, with each cell's image to resample by."""
    oof = _read_predictions(folder / method / "oof.csv", f"train_classifier@{method}")
    return oof.merge(images, on="cell_id", validate="one_to_one")


def _test_spread(evaluation: dict) -> dict:
    """Per test domain: macro-F1 across training seeds (empty when the test split was not scored)."""
    return {d: v["macro_f1"] for d, v in evaluation.get("seeds", {}).get("domains", {}).items()}


def _worst_class(per_class: dict) -> str:
    label, worst = min(per_class.items(), key=lambda item: (item[1]["kept"], item[0]))
    became = f" (mostly became {worst['mostly_became']})" if worst["mostly_became"] else ""
    return f"{label} {worst['kept']:.2f}{became}"


def _gain_cell(gain: dict | None) -> str:
    if gain is None:
        return "-"
    low, high = gain["interval"]
    return f"{gain['difference']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _at_true_boxes_cell(domains: dict) -> str:
    """The classifier alone on the smear-field cells, cut at their true boxes (coarse macro-F1 per
    domain): what end to end would score with a perfect detector."""
    cells = [
        f"{domain}: {_cell(at['coarse_macro_f1'], *at['coarse_macro_f1_interval'])}"
        for domain, scores in domains.items()
        if (at := scores.get("at_true_boxes"))
    ]
    return "; ".join(cells) or "-"


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _link(target: Path, report: Path) -> str:
    return Path(os.path.relpath(target, report.parent)).as_posix()


def _report(
    methods: Sequence[str],
    result: dict,
    translations: Sequence[str],
    table: pd.DataFrame,
    evaluations: dict,
    metrics: Path,
    report: Path,
    plots: Path,
    translate_plots: Path,
) -> str:
    grid = table.assign(cell=[_cell(r.macro_f1, r.low, r.high) for r in table.itertuples()])
    grid = grid.pivot(index="method", columns="domain", values="cell").reindex(list(methods)).reset_index()
    end_to_end = []
    for method, e in evaluations.items():
        if e.get("status") == "none":
            end_to_end.append({"method": method, "macro-F1 (fine)": f"not scored: {e['reason']}"})
            continue
        overall, cytologia = e["overall"], e["overall"].get("cytologia", {})
        end_to_end.append(
            {
                "method": method,
                "macro-F1 (fine)": _cell(overall["macro_f1"], *overall["macro_f1_interval"]),
                "macro-F1 (coarse)": _cell(overall["coarse_macro_f1"], *overall["coarse_macro_f1_interval"]),
                "balanced acc.": _cell(overall["balanced_accuracy"], *overall["balanced_accuracy_interval"]),
                "CytologIA score": _cell(cytologia["score"], *cytologia["score_interval"]) if cytologia else "-",
                "macro-F1 across seeds": _spread_cell(e["seeds"]["overall"]["macro_f1"]),
                "missed boxes": cytologia.get("missed_boxes", "-"),
                "field cells at true boxes, macro-F1 (coarse)": _at_true_boxes_cell(e["domains"]),
                "ECE (calibrated / raw)": f"{e['calibration']['ece']:.4f} / {e['calibration']['ece_uncalibrated']:.4f}",
                "test cells": overall["cells"],
                "target information (IM, nats, no labels)": _optional(
                    result["selection"][method]["target_information"]
                ),
                "est. target acc. (ATC, no labels)": _optional(result["selection"][method]["atc_target_accuracy"]),
                "macro-F1 (coarse) minus none, paired": _gain_cell(result["coarse_macro_f1_minus_none"].get(method)),
                "source OOF macro-F1 (fine) minus none, paired": _gain_cell(
                    result["oof_macro_f1_minus_none"].get(method)
                ),
                "target slice macro-F1 (coarse)": _optional(
                    result["selection"][method]["target_labelled_coarse_macro_f1"]
                ),
            }
        )
    lines = [
        "# hemaflow results",
        "",
        "Generated by the `compare` stage from `metrics/` and `plots/`; rebuilt by `dvc repro`. Intervals are 95 %",
        "percentile bootstraps over test images (the cells of one image resampled together); *minus none,",
        "paired* resamples the same images for a method and for none, the interval of their difference.",
        'Values are the first training seed\'s models; "across seeds" is the mean ± standard deviation over',
        "`base.seeds`.",
        f"The deployed adaptation method (used by `hemaflow predict`) is **{result['deployed_method']}**: "
        f"{result['deployed_because']}.",
        "The best on the test split (reported, never used to choose) is "
        f"{result['best_on_test'] or 'unknown (no test split)'} (macro-F1 over coarse groups).",
        "",
        "## Cross-domain macro-F1",
        "",
        _markdown(grid),
        "",
        f"![cross-domain macro-F1]({_link(plots / 'macro_f1.png', report)})",
        "",
        "## End to end on the test split",
        "",
        "CytologIA score = 0.2 x mean rescaled GIoU + 0.8 x macro-F1: each true box takes the predicted",
        "box with the highest GIoU in its image (predictions de-duplicated, no one-to-one matching),",
        "rescaled GIoU = (GIoU + 1) / 2, and a true box without any prediction scores 0 and a wrong class.",
        "",
        _markdown(pd.DataFrame(end_to_end)),
        "",
    ]
    detect = _read(metrics / "detect.json")
    if detect.get("detector") == "none":
        lines += ["## Detector", "", f"No detector took part: {detect['reason']}.", ""]
    else:
        rows = [
            {
                "split": s,
                "AP50": _cell(detect[s]["AP50"], *detect[s]["AP50_interval"]),
                **{k: detect[s][k] for k in ("mAP", "precision_50", "recall_50", "mean_giou", "cytologia_box_term")},
            }
            for s in ("val", "test")
            if s in detect
        ]
        lines += [
            "## Detector",
            "",
            f"Score threshold {detect['score_threshold']:.4f} ({detect['threshold_from']}). "
            f"Test AP50 of each training seed's detector: {_spread_cell(detect['seeds']['test_AP50'])}."
            if "seeds" in detect
            else f"Score threshold {detect['score_threshold']:.4f} ({detect['threshold_from']}).",
            "",
            _markdown(pd.DataFrame(rows)),
            "",
        ]
    kept = _read(metrics / "check_translations.json")["class_kept"]
    translation = pd.DataFrame(
        [
            {
                "translation": t,
                "SSIM (luminance)": m["ssim_luminance"],
                "KID to target before": m["kid_random_resnet18"]["source_to_target"]["mean"],
                "KID to target after": m["kid_random_resnet18"]["translated_to_target"]["mean"],
                "class kept": kept[t]["kept"],
                "worst class": _worst_class(kept[t]["per_class"]),
            }
            for t in translations
            for m in [_read(metrics / "translate" / f"{t}.json")]
            if m.get("status") != "none"
        ]
    )
    lines += [
        "## Stain translation",
        "",
        "KID is computed on a fixed random ResNet-18's features (no Inception weights offline): compare",
        "the rows with each other, not with published FID/KID values. *Class kept*: the share of",
        "translated source cells that the classifier of the untranslated cells (method none, each cell",
        f"out of fold) still gives their true class; on the untranslated cells it is {kept['untranslated']['kept']:.4f}.",
        "*Worst class*: the class a translation keeps least, and what its cells mostly became.",
        "",
        _markdown(translation),
        "",
        f"![map of the domains before and after each translation]({_link(translate_plots / 'domains.png', report)})",
        "",
        *(f"![{t} samples]({_link(translate_plots / t / 'samples.png', report)})" for t in translations),
        "",
        "## Data",
        "",
        f"![cells per class and domain]({_link(plots.parent / 'data' / 'class_by_domain.png', report)})",
        "",
    ]
    return "\n".join(lines)
