"""The ``hemaflow`` command line: one command per DVC stage, named like the stage, plus tools.

A stage command parses its options (every file it reads or writes is one, so dvc.yaml's ``cmd``
names them all), loads params, checks the names it uses and calls the stage function of the same
name with keyword arguments. Errors a user can fix print as one line (``--debug``: traceback).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
import yaml

from hemaflow.errors import HemaflowError
from hemaflow.params import (
    DatasetFormat,
    Params,
    Translation,
    apply_profile,
    load_params,
    params_markdown,
    parse_params,
    replaces_collections,
)

app = typer.Typer(
    help="Reproducible white-blood-cell detection, stain adaptation and classification, rebuilt by `dvc repro`.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Bring datasets in and inspect the prepared data.", no_args_is_help=True)
params_app = typer.Typer(
    help="Check params.yaml, document it, turn a profile into `dvc exp run -S` overrides.", no_args_is_help=True
)
weights_app = typer.Typer(
    help="Pretrained weights: the only commands that reach the network, and only when you run them.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(params_app, name="params")
app.add_typer(weights_app, name="weights")

_state = {"debug": False}
# px/um as published: Acevedo_20 10 (CellaVision DM96), Matek_19 13.8 and WBC1/WBC2 11.52 (the HIDA
# challenge's 25 um field of view: 345 and 288 px)
KNOWN_SCALE = {
    (DatasetFormat.acevedo20, None): 10.0,
    (DatasetFormat.matek19, None): 13.8,
    **{
        (DatasetFormat.hida, s): v
        for s, v in (
            ("Acevedo_20", 10.0),
            ("Ace_20", 10.0),
            ("Matek_19", 13.8),
            ("Mat_19", 13.8),
            ("WBC1", 11.52),
            ("WBC2", 11.52),
        )
    },
}

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except HemaflowError as exc:
        if _state["debug"]:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _load(path: Path, *, backbone: bool = False, detector: bool = False, datasets: bool = False) -> Params:
    """Read params and check the names the command uses (see hemaflow.checks)."""
    from hemaflow import pin_threads
    from hemaflow.checks import check_params

    with _user_errors():
        params = load_params(path)
        pin_threads(params.base.cpu_threads)
        check_params(params, str(path), backbone=backbone, detector=detector, datasets=datasets)
        return params


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hemaflow {package_version('hemaflow')}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """hemaflow: every result rebuilt by `dvc repro` from versioned data.

    Stage commands (run by dvc.yaml, one per stage): demo-data, prepare, train-detector, detect,
    crop, train-translator, translate, train-classifier, evaluate, check-translations, compare. Tools: predict,
    classify, translate-images, data, params.
    """
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------- stages


@app.command("demo-data")
def demo_data_command(
    out: Annotated[Path, typer.Option(help="Folder to write the demo datasets to (replaced).")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Generate the synthetic demo datasets (stage `demo_data`).

    Three stain domains (two labelled sources like Acevedo_20 and Matek_19, one target like
    WBC1) in the real datasets' native layouts, deterministic for given params.
    """
    from hemaflow.data.demo import demo_data

    params = _load(params_file)
    with _user_errors():
        demo_data(params=params.demo_data, seed=params.base.seed, out=out)
    typer.echo(f"demo datasets written to {out}")


@app.command("prepare")
def prepare_command(
    out: Annotated[Path, typer.Option(help="Folder for the unified dataset (replaced).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for plot data and images.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Ingest, validate and repair, unify classes, normalise scale and split (stage `prepare`).

    Reads the datasets listed under `prepare.datasets` in their native layouts and writes the
    cell index, scale-normalised crops, detector fields with COCO json, and every finding.
    Checks every name in params first (backbone, detector, dataset folders).
    """
    from hemaflow.data.prepare import prepare
    from hemaflow.data.report import format_report

    params = _load(params_file, backbone=True, detector=True, datasets=True)
    with _user_errors():
        prepare(params=params.prepare, seed=params.base.seed, out=out, metrics=metrics, plots=plots)
    typer.echo(format_report(out, limit=10))


@app.command("train-detector")
def train_detector_command(
    prepared: Annotated[Path, typer.Option(help="Prepared folder with fields/ and coco/.")],
    work_dir: Annotated[Path, typer.Option(help="mmengine work dir: checkpoints and logs (kept, for resuming).")],
    out: Annotated[Path, typer.Option(help="Folder for best.safetensors + detector.json (the model card).")],
    plots: Annotated[Path, typer.Option(help="Folder for the per-epoch curves.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the single-class white-cell detector with MMDetection (stage `train_detector`).

    Architecture and schedule from `detect`; every architecture has a GIoU box loss. An
    interrupted training resumes from its last epoch. The card records the score threshold that
    maximises F1 at IoU 0.5 on the validation fields. Without smear fields in the data no detector
    is trained and the card says so.
    """
    from hemaflow.detect.train import train_detector

    params = _load(params_file, detector=True)
    with _user_errors():
        train_detector(
            params=params.detect,
            fields_px_per_um=params.prepare.fields.px_per_um,
            seeds=params.base.seeds,
            prepared=prepared,
            work_dir=work_dir,
            out=out,
            plots=plots,
        )


@app.command("detect")
def detect_command(
    prepared: Annotated[Path, typer.Option(help="Prepared folder (images.csv, cells.csv).")],
    model: Annotated[Path, typer.Option(help="Folder of the trained detector.")],
    out: Annotated[Path, typer.Option(help="Folder for <split>.csv detections.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Detect white cells on the fields of every split and score them (stage `detect`).

    Writes <out>/<split>.csv (image, x1, y1, x2, y2, score in original pixels) and COCO mAP, AP50
    (with its 95 % interval), precision and recall at IoU 0.5, mean GIoU and the CytologIA box term.
    """
    from hemaflow.detect.detect import detect

    params = _load(params_file, detector=True)
    with _user_errors():
        detect(
            params=params.detect,
            predict=params.predict,
            evaluation=params.evaluate,
            seed=params.base.seed,
            prepared=prepared,
            model=model,
            out=out,
            metrics=metrics,
        )


@app.command("crop")
def crop_command(
    prepared: Annotated[Path, typer.Option(help="Prepared folder (cells.csv + crops).")],
    detections: Annotated[Path, typer.Option(help="The detect stage's boxes (train.csv, val.csv).")],
    out: Annotated[Path, typer.Option(help="Folder for the training crops and their cells.csv (replaced).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write (where the crops were cut).")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Cut the classifier's training crops as inference cuts them (stage `crop`).

    Smear cells are cut around the detection that best matches their true box (GIoU), as the
    classifier will see them at inference (`crop.train_boxes: detected`); single-cell images keep
    their prepared crop.
    """
    from hemaflow.data.crop import crop

    params = _load(params_file)
    with _user_errors():
        crop(
            params=params.crop,
            geometry=params.prepare.crop,
            max_pixels=params.prepare.max_pixels,
            prepared=prepared,
            detections=detections,
            out=out,
            metrics=metrics,
        )


@app.command("train-translator")
def train_translator_command(
    prepared: Annotated[Path, typer.Option(help="Prepared folder (cells.csv + crops).")],
    out: Annotated[Path, typer.Option(help="Folder for the generators (.safetensors) and translator.json.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for losses.csv and samples.png.")],
    state: Annotated[Path, typer.Option(help="Per-epoch training state, for resuming.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train CycleGAN from the labelled source cells to the unlabelled target cells (stage `train_translator`).

    Recipe and sizes from `translate.cyclegan`; an interrupted run resumes after its last epoch.
    """
    from hemaflow.translate.train import train_translator

    params = _load(params_file)
    with _user_errors():
        train_translator(
            params=params.translate.cyclegan,
            seed=params.base.seed,
            crop_pixels=params.prepare.crop.pixels,
            prepared=prepared,
            out=out,
            metrics=metrics,
            plots=plots,
            state=state,
        )


@app.command("translate")
def translate_command(
    method: Annotated[Translation, typer.Option(help="How the training cells are brought to the target's look.")],
    crops: Annotated[Path, typer.Option(help="The crop stage's training cells.")],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (the target cells).")],
    out: Annotated[Path, typer.Option(help="Output folder (replaced).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for samples.png.")],
    translator: Annotated[Path | None, typer.Option(help="Trained CycleGAN (method cyclegan only).")] = None,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Write every labelled training cell in the target's look, labels kept (stages `translate@M`, `translate_cyclegan`).

    Also scores the translation: SSIM to the input (structure kept), KID to the target on a fixed
    random ResNet-18 (look changed), and a sample grid.
    """
    from hemaflow.translate.translate import translate

    params = _load(params_file)
    with _user_errors():
        translate(
            method=method,
            reference_cells=params.translate.reference_cells,
            seed=params.base.seed,
            crops=crops,
            prepared=prepared,
            translator=translator,
            out=out,
            metrics=metrics,
            plots=plots,
        )


@app.command("train-classifier")
def train_classifier_command(
    method: Annotated[str, typer.Option(help="The adaptation method (a name in adapt.methods) whose recipe trains.")],
    cells: Annotated[Path, typer.Option(help="Training cells (a translate stage's output: cells.csv + crops).")],
    crops: Annotated[
        Path,
        typer.Option(
            help="The untranslated training crops (the crop stage's output), drawn beside a translation's "
            "where the recipe's augment_share is below 1."
        ),
    ],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (the target cells the recipe may use).")],
    out: Annotated[Path, typer.Option(help="Folder for the fold models (.safetensors + .json).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for curves, the confusion data and the reliability diagram.")],
    state: Annotated[Path, typer.Option(help="Per-epoch training states, for resuming.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train k-fold timm classifiers on cell crops for one adaptation method (stage `train_classifier@METHOD`).

    Architecture from `model`, training from `classify`, the method's recipe (augmentation toward
    the target, AdaBN, self-training, few-shot) from `adapt.methods.METHOD`. Out-of-fold scores and
    calibration (temperature per fold, fitted on its held-out fold); an estimate of target accuracy
    without target labels. An interrupted run resumes from its last epoch. Under `torchrun
    --nproc_per_node N` it trains with DistributedDataParallel.
    """
    from hemaflow.classify.train import train_classifier

    params = _load(params_file, backbone=True)
    with _user_errors():
        if method not in params.adapt.methods:
            raise HemaflowError(f"--method {method}: not in adapt.methods ({', '.join(params.adapt.methods)})")
        train_classifier(
            model_params=params.model,
            params=params.classify,
            recipe=params.adapt.methods[method],
            seeds=params.base.seeds,
            cells=cells,
            crops=crops,
            prepared=prepared,
            out=out,
            metrics=metrics,
            plots=plots,
            state=state,
        )


@app.command("evaluate")
def evaluate_command(
    method: Annotated[str, typer.Option(help="The adaptation method whose classifier is scored (adapt.methods).")],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (the labelled test cells).")],
    detections: Annotated[Path, typer.Option(help="The detect stage's boxes (test.csv).")],
    classifier: Annotated[Path, typer.Option(help="The method's fold models.")],
    out: Annotated[Path, typer.Option(help="CSV to write: one row per test cell, truth and prediction.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for the confusion, per-class F1 and coverage data.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Score the test split end to end, each number with its 95 % interval (stage `evaluate@METHOD`).

    Writes the CytologIA score, macro-F1 on fine classes and on coarse groups, balanced accuracy,
    per-class precision/recall/F1, overall and per test domain; calibration error; the review
    queue (`predict.review_below`).
    """
    from hemaflow.evaluate.evaluate import evaluate

    params = _load(params_file, backbone=True)
    with _user_errors():
        evaluate(
            method=method,
            geometry=params.prepare.crop,
            classify=params.classify,
            review_below=params.predict.review_below,
            evaluation=params.evaluate,
            seed=params.base.seed,
            prepared=prepared,
            detections=detections,
            classifier=classifier,
            out=out,
            metrics=metrics,
            plots=plots,
        )


@app.command("compare")
def compare_command(
    metrics: Annotated[Path, typer.Option(help="The metrics folder the other stages wrote.")],
    evaluated: Annotated[Path, typer.Option(help="Folder of evaluate's per-cell tables (<method>.csv).")],
    classifiers: Annotated[
        Path, typer.Option(help="Folder of the trained classifiers (<method>/oof.csv: out-of-fold source cells).")
    ],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (the untranslated cells).")],
    translated: Annotated[Path, typer.Option(help="Folder of the translate stages' outputs.")],
    out: Annotated[Path, typer.Option(help="The cross-domain table (JSON) to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for the cross-domain plots.")],
    translate_plots: Annotated[Path, typer.Option(help="Folder for the map of the domains (principal components).")],
    report: Annotated[Path, typer.Option(help="Markdown report to write.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Build the cross-domain table, the map of the domains and the report (stage `compare`)."""
    from hemaflow.evaluate.compare import compare

    params = _load(params_file)
    with _user_errors():
        compare(
            methods=list(params.adapt.methods),
            deployed=params.adapt.deploy,
            source_tolerance=params.adapt.source_tolerance,
            translations=params.translations,
            metrics=metrics,
            evaluated=evaluated,
            classifiers=classifiers,
            evaluation=params.evaluate,
            seed=params.base.seed,
            prepared=prepared,
            translated=translated,
            out=out,
            plots=plots,
            translate_plots=translate_plots,
            report=report,
        )
    typer.echo(f"cross-domain table -> {out}; report -> {report}")


@app.command("check-translations")
def check_translations_command(
    crops: Annotated[Path, typer.Option(help="The crop stage's untranslated training cells.")],
    translated: Annotated[Path, typer.Option(help="Folder of the translate stages' outputs.")],
    classifier: Annotated[Path, typer.Option(help="Fold models trained on the untranslated cells (method none).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    plots: Annotated[Path, typer.Option(help="Folder for class_kept.csv.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Check that each translation keeps the class (stage `check_translations`).

    The classifier trained on untranslated source cells scores every translated source cell out of
    fold; the share still given its true class, against that share on the untranslated cells, and
    per class the class cells mostly became.
    """
    from hemaflow.evaluate.translations import check_translations

    params = _load(params_file)
    with _user_errors():
        check_translations(
            translations=params.translations,
            classify=params.classify,
            crops=crops,
            translated=translated,
            classifier=classifier,
            metrics=metrics,
            plots=plots,
        )


# ----------------------------------------------------------------------------------------------- tools


@app.command("predict")
def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Smear images of any size, or folders of them.")],
    out: Annotated[Path, typer.Option(help="CSV to write: NAME, x1, y1, x2, y2, class, scores, review, path.")],
    px_per_um: Annotated[float, typer.Option(help="Pixels per micrometre of the images.")],
    annotated: Annotated[
        Path | None, typer.Option(help="Folder for copies of the images with boxes and classes drawn.")
    ] = None,
    detector: Annotated[Path, typer.Option(help="Folder of the trained detector.")] = Path("models/detector"),
    classifier: Annotated[
        Path | None,
        typer.Option(
            help="Classifier folder [default: models/classifier/<adapt.deploy>; with auto, the method compare chose]."
        ),
    ] = None,
    boxes_only: Annotated[
        bool, typer.Option("--boxes-only", help="Detect only: no classifier, empty class column.")
    ] = False,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Find and classify every white cell: one CSV row per cell, in the CytologIA submission layout.

    Detector (tiled on large images, the `detect` stage's threshold) -> crop at the training field
    of view -> classifier fold ensemble with TTA and calibrated probabilities. A cell whose
    confidence is below `predict.review_below` is flagged `review`. NAME is the image's path
    relative to the folder given (its file name for a file given directly). Extra detectors and
    classifiers come from `predict` in params.yaml. Rows stream to disk: folders of any size fit.
    """
    from hemaflow.classify.adapt import deployed_method
    from hemaflow.data.images import expand_images
    from hemaflow.predict import CellPipeline, image_names, predict_images

    params = _load(params_file, backbone=not boxes_only, detector=True)
    with _user_errors():
        chosen = None if boxes_only else classifier or Path("models/classifier") / deployed_method(params.adapt.deploy)
        pipeline = CellPipeline.load(params, detector, chosen)
        paths = expand_images(images)
        summary = predict_images(pipeline, paths, image_names(paths, images), px_per_um, out, annotated)
    for skipped in summary["skipped"]:
        typer.echo(f"skipped {skipped}", err=True)
    speed = f"{summary['ms_per_image']:.1f} ms/image" if summary["ms_per_image"] else "no image read"
    typer.echo(
        f"{summary['images']} images, {summary['cells']} cells ({summary['review']} for review) -> {out} "
        f"({speed} on {pipeline.device.type})"
    )


@app.command("classify")
def classify_command(
    images: Annotated[list[Path], typer.Argument(help="Single-cell images, or folders of them.")],
    out: Annotated[Path, typer.Option(help="CSV to write: image, class, confidence, one column per class.")],
    models: Annotated[
        Path | None,
        typer.Option(
            help="Folder of fold models [default: models/classifier/<adapt.deploy>; with auto, the method compare chose]."
        ),
    ] = None,
    px_per_um: Annotated[
        float | None,
        typer.Option(help="Scale of the images: crops them to the training field of view first (else used whole)."),
    ] = None,
    tta: Annotated[bool, typer.Option(help="Average over the flips in classify.tta.")] = True,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Classify single-cell images with the fold ensemble (+ flip TTA), calibrated probabilities."""
    from hemaflow._io import write_csv
    from hemaflow.classify.adapt import deployed_method
    from hemaflow.classify.inference import classify_images
    from hemaflow.runtime import select_device

    params = _load(params_file, backbone=True)
    with _user_errors():
        chosen = models or Path("models/classifier") / deployed_method(params.adapt.deploy)
        table = classify_images(
            images,
            chosen,
            params.prepare.crop,
            px_per_um,
            params.classify.tta if tta else [],
            params.prepare.max_pixels,
            select_device(params.classify.device, "classify.device"),
        )
        write_csv(out, table)
    typer.echo(f"{len(table)} images classified -> {out}")


@app.command("translate-images")
def translate_images_command(
    images: Annotated[list[Path], typer.Argument(help="Single-cell images, or folders of them.")],
    out: Annotated[Path, typer.Option(help="Folder for the translated images (PNG, same stem).")],
    to: Annotated[str, typer.Option(help="Direction: `target` (source look -> target look) or `source`.")] = "target",
    model: Annotated[Path, typer.Option(help="Folder of the trained translator.")] = Path("models/translator"),
    px_per_um: Annotated[
        float | None,
        typer.Option(help="Scale of the images: crops them to the training field of view first (else used whole)."),
    ] = None,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Translate single-cell images with the trained CycleGAN generator."""
    from hemaflow.translate.translate import translate_images

    params = _load(params_file)
    with _user_errors():
        if to not in ("target", "source"):
            raise HemaflowError(f"--to: expected `target` or `source`, got {to!r}")
        errors = translate_images(
            images, model, f"to_{to}", params.prepare.crop, px_per_um, out, params.prepare.max_pixels
        )
    for error in errors:
        typer.echo(f"skipped {error}", err=True)
    typer.echo(f"translated to the {to} look -> {out} ({len(errors)} skipped)")


@data_app.command("report")
def data_report(
    prepared: Annotated[Path, typer.Option(help="The prepared folder to summarise.")] = Path("data/prepared"),
    limit: Annotated[int, typer.Option(help="Findings to list (all are in findings.csv).")] = 50,
) -> None:
    """Counts per class x domain x split, classes a domain lacks, and every finding.

    Findings are listed rejected first, then repaired, clipped, unlabelled and converted rows.
    """
    from hemaflow.data.report import format_report

    with _user_errors():
        if not (prepared / "cells.csv").exists():
            raise HemaflowError(f"{prepared}: no cells.csv; run `dvc repro prepare` first")
        typer.echo(format_report(prepared, limit))


@data_app.command("import")
def data_import(
    fmt: Annotated[DatasetFormat, typer.Argument(metavar="FORMAT", help="Native layout of SRC.")],
    src: Annotated[Path, typer.Argument(help="The dataset folder, in its native layout.")],
    name: Annotated[str, typer.Option(help="Name under data/raw/ and in params.yaml.")],
    px_per_um: Annotated[
        float | None,
        typer.Option(
            help="Pixels per micrometre. Default: the published scale (acevedo20 10, matek19 13.8), else "
            "px_per_um: auto, estimated from red-cell diameters (the estimate is printed)."
        ),
    ] = None,
    subset: Annotated[
        str | None, typer.Option(help="The part of the layout to read (a BCCD split, a HIDA dataset, a Raabin set).")
    ] = None,
    raw_dir: Annotated[Path, typer.Option(help="Where raw datasets live (versioned by data.dvc).")] = Path("data/raw"),
) -> None:
    """Check a dataset's layout, copy it into data/raw/NAME, and print its params.yaml entry.

    Then version it with `dvc commit -f data.dvc` (data.dvc tracks data/raw) and add the
    printed entry to `prepare.datasets` with `prepare.root: data/raw`.
    """
    from tqdm import tqdm

    from hemaflow._io import atomic_dir
    from hemaflow.data.formats import read_dataset

    with _user_errors():
        result = read_dataset(fmt, src, subset)
        scale = px_per_um or KNOWN_SCALE.get((fmt, subset)) or "auto"
        if scale == "auto":
            typer.echo(_scale_line(result, src))
        files = [p for p in sorted(src.rglob("*")) if p.is_file()]
        with atomic_dir(raw_dir / name) as staging:
            for path in tqdm(files, desc=f"import {name}", unit="file"):
                target = staging / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        entry = {"name": name, "format": fmt.value, "path": name, "role": "source", "px_per_um": scale}
        entry |= {"subset": subset} if subset else {}
        typer.echo(
            f"{name}: {len(result.annotations)} cells, {len(result.background_images)} background images, "
            f"{sum(f.action == 'rejected' for f in result.findings)} rows rejected so far -> {raw_dir / name}\n"
            "Add to prepare.datasets in params.yaml (role: source, target or test):\n"
            + yaml.safe_dump([entry], sort_keys=False)
        )


def _scale_line(result, root: Path) -> str:
    from hemaflow.data.calibrate import estimate_px_per_um

    names = sorted({a.image for a in result.annotations} | set(result.background_images))
    try:
        estimate = estimate_px_per_um([root / n for n in names])
    except ValueError as exc:
        raise HemaflowError(f"{root}: px_per_um auto: {exc}; pass --px-per-um") from None
    low, high = estimate.spread
    return (
        f"px_per_um auto: {estimate.px_per_um:.3f} (interquartile {low:.3f}-{high:.3f}) from "
        f"{estimate.red_cells} red cells in {estimate.images} images ({estimate.method})"
    )


@data_app.command("scale")
def data_scale(
    fmt: Annotated[DatasetFormat, typer.Argument(metavar="FORMAT", help="Native layout of SRC.")],
    src: Annotated[Path, typer.Argument(help="The dataset folder, in its native layout.")],
    subset: Annotated[
        str | None, typer.Option(help="The part of the layout to read (a BCCD split, a HIDA dataset, a Raabin set).")
    ] = None,
) -> None:
    """Estimate a dataset's pixels per micrometre from its red cells (what px_per_um: auto uses).

    Red cells on a dried, stained film measure about 7.5 um across; their diameter in pixels over
    7.5 gives the scale. Prints the estimate, its interquartile spread and how many cells it rests on.
    """
    from hemaflow.data.formats import read_dataset

    with _user_errors():
        typer.echo(_scale_line(read_dataset(fmt, src, subset), src))


@params_app.command("check")
def params_check(params_file: ParamsOption = Path("params.yaml")) -> None:
    """Validate params.yaml: schema, timm backbone, detector architecture, dataset folders."""
    _load(params_file, backbone=True, detector=True, datasets=True)
    typer.echo(f"{params_file}: valid")


@params_app.command("docs")
def params_docs(out: Annotated[Path, typer.Option(help="Markdown file to write.")] = Path("docs/params.md")) -> None:
    """Write the reference of every params.yaml key (type, bounds, meaning) from the typed schema."""
    from hemaflow._io import write_text

    write_text(out, params_markdown())
    typer.echo(f"params reference -> {out}")


def _flatten(prefix: str, value: object) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
    else:
        yield prefix, value


@params_app.command("overrides")
def params_overrides(
    profile: Annotated[Path, typer.Argument(help="A partial params file, e.g. profiles/gpu.yaml.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Print a profile as `-S key=value` arguments for `dvc exp run`, after validating the result.

    Example: dvc exp run $(hemaflow params overrides profiles/gpu.yaml). A profile that replaces
    lists or method tables (datasets, adaptation methods) needs `hemaflow params use` instead.
    """
    import copy

    with _user_errors():
        overlay = yaml.safe_load(profile.read_text()) or {}
        whole = replaces_collections(overlay)
        if whole:
            raise HemaflowError(
                f"{profile} replaces {', '.join(whole)}, which -S cannot: run `hemaflow params use {profile}`"
            )
        base = yaml.safe_load(params_file.read_text())
        parse_params(apply_profile(copy.deepcopy(base), overlay), f"{params_file} + {profile}")
    pairs = [
        f"-S '{key}={yaml.safe_dump(value, default_flow_style=True).strip()}'" for key, value in _flatten("", overlay)
    ]
    typer.echo(" ".join(p.replace("\n...", "") for p in pairs))


@params_app.command("use")
def params_use(
    profile: Annotated[Path, typer.Argument(help="A params profile, e.g. profiles/shared.yaml.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Write a profile into params.yaml (comments of untouched keys kept), after validating the result.

    Sections merge key by key; lists and method tables the profile gives (prepare.datasets,
    adapt.methods) replace params.yaml's. Then `dvc repro` (or `dvc exp run`) runs the profile;
    `git diff params.yaml` shows what changed and `git checkout params.yaml` goes back.
    """
    import copy
    import io

    from ruamel.yaml import YAML

    from hemaflow._io import write_text

    with _user_errors():
        overlay = yaml.safe_load(profile.read_text()) or {}
        round_trip = YAML()
        data = round_trip.load(params_file.read_text())
        params = parse_params(
            apply_profile(copy.deepcopy(yaml.safe_load(params_file.read_text())), overlay), f"{params_file} + {profile}"
        )
        apply_profile(data, overlay)
        buffer = io.StringIO()
        round_trip.dump(data, buffer)
        write_text(params_file, buffer.getvalue())
    typer.echo(
        f"{params_file}: {profile} applied ({len(params.prepare.datasets)} datasets, "
        f"methods {', '.join(params.adapt.methods)})"
    )


@weights_app.command("get")
def weights_get(
    name: Annotated[
        str,
        typer.Argument(
            help="An entry of `hemaflow weights list` (dinobloom_s/b/l/g, rtmdet_tiny_coco) or any timm "
            "pretrained tag (timm.list_pretrained(), e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where the weights folders live.")] = Path("models/pretrained"),
) -> None:
    """Download pretrained weights once into OUT/NAME (weights.safetensors + card.json), checksum verified.

    timm tags go through timm's and huggingface_hub's download and cache (HF_HUB_OFFLINE,
    HF_HUB_CACHE are honoured). Then version the folder with the printed `dvc add` command and start
    from it with `model.checkpoint: OUT/NAME` (classifier) or `detect.model.checkpoint: OUT/NAME`.
    """
    from hemaflow.pretrained import read_card
    from hemaflow.weights import fetch

    with _user_errors():
        folder = fetch(name, out)  # verified against its checksum
    card = read_card(folder)
    key = "detect.model.checkpoint" if card.kind == "detector" else "model.checkpoint"
    fits = card.detect_model if card.kind == "detector" else {"model.backbone": card.timm_model}
    typer.echo(f"{folder}: {card.kind} weights, sha256 {card.sha256}, licence: {card.licence}")
    typer.echo(f"version it:  dvc add {folder}  (a teammate's `dvc pull` then gets the same bytes)")
    typer.echo(f"use it:      {key}: {folder}  (fits {fits})")


@weights_app.command("list")
def weights_list() -> None:
    """The weights known by name, with their address and what they fit."""
    from hemaflow.weights import registry

    for name, entry in registry().items():
        fits = entry.get("timm_model") or entry.get("detect_model")
        typer.echo(f"{name:18} {entry['kind']:10} {fits}  {entry['url']}")
    typer.echo("...and any timm pretrained tag (timm.list_pretrained()), through the Hugging Face hub.")
