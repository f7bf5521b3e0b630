"""The ``hemaflow`` command line: one command per DVC stage, plus data utilities.

Commands parse arguments, load params and call one stage function; errors the user can fix are
printed as one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml

from hemaflow import __version__
from hemaflow.errors import HemaflowError
from hemaflow.params import AdaptationMethod, DatasetFormat, Params, load_params, parse_params

app = typer.Typer(
    help="Reproducible white-blood-cell detection, stain translation and classification.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Bring datasets in and inspect the prepared data.", no_args_is_help=True)
params_app = typer.Typer(help="Check params.yaml and turn a profile into `dvc exp run -S` overrides.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(params_app, name="params")

_state = {"debug": False}
ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]
KNOWN_SCALE = {DatasetFormat.acevedo20: 10.0, DatasetFormat.matek19: 13.8}  # px/um, as published


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except HemaflowError as exc:
        if _state["debug"]:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _load(path: Path) -> Params:
    with _user_errors():
        return load_params(path)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hemaflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """hemaflow: every result rebuilt by `dvc repro` from versioned data."""
    _state["debug"] = debug


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write the demo datasets to (replaced).")] = Path("data/demo"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Generate the synthetic demo datasets (stage `demo_data`).

    Three stain domains (two labelled sources like Acevedo_20 and Matek_19, one target like
    WBC1) in the real datasets' native layouts, deterministic for given params.
    """
    from hemaflow.data.demo import generate_demo

    params = _load(params_file)
    with _user_errors():
        generate_demo(params.demo_data, params.base.seed, out)
    typer.echo(f"demo datasets written to {out}")


@app.command("prepare")
def prepare(
    out: Annotated[Path, typer.Option(help="Folder for the unified dataset (replaced).")] = Path("data/prepared"),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics/data.json"),
    plots: Annotated[Path, typer.Option(help="Folder for plot data and images.")] = Path("plots/data"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Ingest, validate and repair, unify classes, normalise scale and split (stage `prepare`).

    Reads the datasets listed under `prepare.datasets` in their native layouts and writes the
    cell index, scale-normalised crops, detector fields with COCO json, and every finding.
    """
    from hemaflow.data.prepare import prepare as run_prepare
    from hemaflow.data.report import format_report

    params = _load(params_file)
    with _user_errors():
        run_prepare(params.prepare, params.base.seed, out, metrics, plots)
    typer.echo(format_report(out, limit=10))


@app.command("train-classifier")
def train_classifier(
    cells: Annotated[Path, typer.Option(help="Prepared (or translated) folder with cells.csv and crops.")] = Path(
        "data/prepared"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the fold models (.safetensors + .json).")] = Path(
        "models/classifier"
    ),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics/classify.json"),
    plots: Annotated[Path, typer.Option(help="Folder for curves and the confusion data.")] = Path("plots/classify"),
    test_cells: Annotated[
        Path | None, typer.Option(help="Folder whose role=test cells are scored [default: --cells].")
    ] = None,
    state: Annotated[Path, typer.Option(help="Per-epoch training states, for resuming.")] = Path(
        ".cache/hemaflow/train_classifier"
    ),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train k-fold timm classifiers on cell crops (stage `train_classifier`).

    Architecture from `model`, training from `classify` in params.yaml. An interrupted run
    resumes from its last epoch. Under `torchrun --nproc_per_node N` it trains with
    DistributedDataParallel (NCCL on GPU, gloo on CPU).
    """
    from hemaflow.classify.train import train_classifier as run_training

    params = _load(params_file)
    with _user_errors():
        run_training(params.model, params.classify, params.base.seed, cells, test_cells or cells, out, metrics, plots,
                     state)  # fmt: skip


@app.command("train-translator")
def train_translator(
    prepared: Annotated[Path, typer.Option(help="Prepared folder (cells.csv + crops).")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="Folder for the generators (.safetensors) and translator.json.")] = Path(
        "models/translator"
    ),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics/translator.json"),
    plots: Annotated[Path, typer.Option(help="Folder for losses.csv and samples.png.")] = Path("plots/translator"),
    state: Annotated[Path, typer.Option(help="Per-epoch training state, for resuming.")] = Path(
        ".cache/hemaflow/train_translator"
    ),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train CycleGAN from the labelled source cells to the unlabelled target cells (stage `train_translator`).

    Recipe and sizes from `translate.cyclegan`; an interrupted run resumes after its last epoch.
    """
    from hemaflow.translate.train import train_translator as run_training

    params = _load(params_file)
    with _user_errors():
        run_training(params.translate.cyclegan, params.base.seed, params.prepare.crop.pixels, prepared, out, metrics,
                     plots, state)  # fmt: skip


@app.command("translate-cells")
def translate_cells(
    method: Annotated[AdaptationMethod, typer.Option(help="How source cells are adapted to the target.")],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (cells.csv + crops).")] = Path("data/prepared"),
    translator: Annotated[Path, typer.Option(help="Trained CycleGAN (method cyclegan only).")] = Path(
        "models/translator"
    ),
    out: Annotated[Path | None, typer.Option(help="Output folder [default: data/translated/METHOD].")] = None,
    metrics: Annotated[Path | None, typer.Option(help="[default: metrics/translate/METHOD.json]")] = None,
    plots: Annotated[Path | None, typer.Option(help="[default: plots/translate/METHOD]")] = None,
    detections: Annotated[
        Path, typer.Option(help="The detect stage's boxes (train.csv, val.csv), read when classify.train_boxes is `detected`.")
    ] = Path("data/detections"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Write every labelled source cell in the target's look, labels kept (stage `translate@METHOD`).

    Smear cells are first cut around the detection that best matches their true box (GIoU), as
    the classifier will see them at inference (`classify.train_boxes`). Also scores the method:
    SSIM to the input (structure kept), KID to the target on a fixed random ResNet-18 (look
    changed) and a sample grid.
    """
    from hemaflow.classify.crops import DetectedCrops, read_detections
    from hemaflow.translate.apply import translate_cells as run_translation

    params = _load(params_file)
    name = method.value
    with _user_errors():
        detected = None
        if params.classify.train_boxes == "detected":
            detected = DetectedCrops(read_detections(detections), params.classify.min_match_giou, params.prepare.crop,
                                     params.prepare.max_pixels)  # fmt: skip
        run_translation(method, params.translate.reference_cells, params.base.seed, prepared,
                        translator if method is AdaptationMethod.cyclegan else None,
                        out or Path("data/translated") / name, metrics or Path("metrics/translate") / f"{name}.json",
                        plots or Path("plots/translate") / name, detected)  # fmt: skip


@app.command("translate")
def translate(
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
    """Translate single-cell images with a trained CycleGAN generator."""
    from hemaflow.translate.apply import translate_images

    params = _load(params_file)
    with _user_errors():
        if to not in ("target", "source"):
            raise HemaflowError(f"--to: expected `target` or `source`, got {to!r}")
        errors = translate_images(images, model, f"to_{to}", params.prepare.crop, px_per_um, out, params.prepare.max_pixels)
    for error in errors:
        typer.echo(f"skipped {error}", err=True)
    typer.echo(f"translated to the {to} look -> {out} ({len(errors)} skipped)")


@app.command("classify")
def classify(
    images: Annotated[list[Path], typer.Argument(help="Single-cell images, or folders of them.")],
    out: Annotated[Path, typer.Option(help="CSV to write: image, class, confidence, one column per class.")],
    models: Annotated[
        Path | None, typer.Option(help="Folder of fold models [default: models/classifier/<translate.method>].")
    ] = None,
    px_per_um: Annotated[
        float | None,
        typer.Option(help="Scale of the images: crops them to the training field of view first (else used whole)."),
    ] = None,
    tta: Annotated[bool, typer.Option(help="Average over the flips in classify.tta.")] = True,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Classify single-cell images with the fold ensemble (+ flip TTA)."""
    from hemaflow._io import write_csv
    from hemaflow.classify.inference import classify_images

    params = _load(params_file)
    with _user_errors():
        tta_views = params.classify.tta if tta else []
        chosen = models or Path("models/classifier") / params.translate.method.value
        table = classify_images(images, chosen, params.prepare.crop, px_per_um, tta_views, params.prepare.max_pixels)
        write_csv(out, table)
    typer.echo(f"{len(table)} images classified -> {out}")


@app.command("train-detector")
def train_detector(
    prepared: Annotated[Path, typer.Option(help="Prepared folder with fields/ and coco/.")] = Path("data/prepared"),
    work_dir: Annotated[Path, typer.Option(help="mmengine work dir: checkpoints and logs (kept, for resuming).")] = Path(
        "models/detector_work"
    ),
    out: Annotated[Path, typer.Option(help="Folder for best.safetensors + best.json.")] = Path("models/detector"),
    plots: Annotated[Path, typer.Option(help="Folder for the per-epoch curves.")] = Path("plots/detect"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the single-class white-cell detector with MMDetection (stage `train_detector`).

    Architecture and schedule from `detect` in params.yaml (rtmdet, yolox, fcos or faster_rcnn,
    all with a GIoU box loss). An interrupted training resumes from its last epoch.
    """
    from hemaflow.detect.train import train_detector as run_training

    params = _load(params_file)
    with _user_errors():
        run_training(params.detect, params.base.seed, prepared, work_dir, out, plots)


@app.command("detect-splits")
def detect_splits(
    prepared: Annotated[Path, typer.Option(help="Prepared folder (images.csv, cells.csv).")] = Path("data/prepared"),
    model: Annotated[Path, typer.Option(help="Folder of the trained detector.")] = Path("models/detector"),
    out: Annotated[Path, typer.Option(help="Folder for <split>.csv detections.")] = Path("data/detections"),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics/detect.json"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Detect white cells on the fields of every split and score them (stage `detect`).

    Writes data/detections/<split>.csv (image, x1, y1, x2, y2, score in original pixels) and COCO
    mAP, AP50, AP75, recall at IoU 0.5, mean GIoU of matched boxes and the CytologIA box term.
    """
    from hemaflow.detect.apply import detect_splits as run_detection

    params = _load(params_file)
    with _user_errors():
        run_detection(params.detect, params.prepare.fields.px_per_um, prepared, model, out, metrics)


@app.command("detect")
def detect(
    images: Annotated[list[Path], typer.Argument(help="Smear images of any size, or folders of them.")],
    out: Annotated[Path, typer.Option(help="CSV to write: image, x1, y1, x2, y2, score.")],
    px_per_um: Annotated[float, typer.Option(help="Pixels per micrometre of the images.")],
    model: Annotated[Path, typer.Option(help="Folder of the trained detector.")] = Path("models/detector"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Find white cells on smear images: rescaled to the training pixel size, tiled when large."""
    from hemaflow._io import write_csv
    from hemaflow.data.images import expand_images
    from hemaflow.detect.apply import detect_images

    params = _load(params_file)
    with _user_errors():
        table = detect_images(expand_images(images), params.detect, params.prepare.fields.px_per_um, model, px_per_um)
        write_csv(out, table)
    typer.echo(f"{table['image'].nunique()} images with boxes, {len(table)} boxes -> {out}")


@app.command("evaluate")
def evaluate(
    method: Annotated[AdaptationMethod, typer.Option(help="Whose classifier: models/classifier/METHOD.")],
    prepared: Annotated[Path, typer.Option(help="Prepared folder (images.csv, cells.csv).")] = Path("data/prepared"),
    detector: Annotated[Path, typer.Option(help="Folder of the trained detector.")] = Path("models/detector"),
    classifiers: Annotated[Path, typer.Option(help="Folder holding one classifier folder per method.")] = Path(
        "models/classifier"
    ),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Score the test split end to end: detect, crop, classify (stage `evaluate@METHOD`).

    Writes metrics/evaluate/METHOD.json (CytologIA score, box term, mean GIoU, macro-F1 on fine
    classes and the five main types, per-class precision/recall/F1, per test domain),
    plots/evaluate/METHOD/ (confusion, per-class F1) and data/evaluated/METHOD.csv (every cell).
    """
    from hemaflow.evaluate.evaluate import evaluate as run_evaluation

    params = _load(params_file)
    name = method.value
    with _user_errors():
        run_evaluation(params, name, prepared, detector, classifiers / name, Path("data/evaluated") / f"{name}.csv",
                       Path("metrics/evaluate") / f"{name}.json", Path("plots/evaluate") / name)  # fmt: skip


@app.command("compare")
def compare(
    metrics: Annotated[Path, typer.Option(help="The metrics folder the other stages wrote.")] = Path("metrics"),
    report: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path("reports/README.md"),
    prepared: Annotated[Path, typer.Option(help="Prepared folder (the untranslated cells).")] = Path("data/prepared"),
    translated: Annotated[Path, typer.Option(help="Folder of data/translated/METHOD outputs.")] = Path("data/translated"),
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Build the cross-domain table, the UMAP of the domains and the report (stage `compare`).

    metrics/cross_domain.json: macro-F1 of every adaptation method in translate.methods on the
    source domains (out-of-fold) and on each test domain (end to end); plots/cross_domain/;
    plots/translate/umap.png (+ .csv): cells before and after each method's translation.
    """
    from hemaflow.evaluate.compare import compare as run_compare
    from hemaflow.translate.domain import domain_map

    params = _load(params_file)
    methods = [m.value for m in params.translate.methods]
    with _user_errors():
        domain_map(prepared, translated, methods, params.base.seed, Path("plots/translate/umap.csv"),
                   Path("plots/translate/umap.png"))  # fmt: skip
        run_compare(methods, params.translate.method.value, metrics, metrics / "cross_domain.json",
                    Path("plots/cross_domain"), report)  # fmt: skip
    typer.echo(f"cross-domain table -> {metrics / 'cross_domain.json'}; report -> {report}")


@app.command("predict")
def predict(
    images: Annotated[list[Path], typer.Argument(help="Smear images of any size, or folders of them.")],
    out: Annotated[Path, typer.Option(help="CSV to write: NAME, x1, y1, x2, y2, class (+ scores, path).")],
    px_per_um: Annotated[float, typer.Option(help="Pixels per micrometre of the images.")],
    annotated: Annotated[Path | None, typer.Option(help="Folder for copies of the images with boxes and classes drawn.")] = None,
    detector: Annotated[Path, typer.Option(help="Folder of the trained detector.")] = Path("models/detector"),
    classifier: Annotated[
        Path | None, typer.Option(help="Classifier folder [default: models/classifier/<translate.method>].")
    ] = None,
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Find and classify every white cell: one CSV row per cell, in the CytologIA submission layout.

    Detector (tiled on large images) -> crop at the training field of view -> classifier fold
    ensemble with TTA; extra detectors (fused by WBF) and classifiers (probabilities averaged)
    come from `predict` in params.yaml. Streams rows to disk, so folders of any size fit in memory.
    """
    from hemaflow.data.images import expand_images
    from hemaflow.predict import CellPipeline, predict_folder

    params = _load(params_file)
    with _user_errors():
        chosen = classifier or Path("models/classifier") / params.translate.method.value
        pipeline = CellPipeline.load(params, detector, chosen, params.detect.device)
        summary = predict_folder(pipeline, expand_images(images), px_per_um, out, annotated)
    for skipped in summary["skipped"]:
        typer.echo(f"skipped {skipped}", err=True)
    speed = f"{summary['ms_per_image']:.1f} ms/image" if summary["ms_per_image"] else "no image read"
    typer.echo(f"{summary['images']} images, {summary['cells']} cells -> {out} ({speed} on {pipeline.device.type})")


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
        typer.Option(help="Pixels per micrometre; required unless the format publishes it (acevedo20 10, matek19 13.8)."),
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
        scale = px_per_um or KNOWN_SCALE.get(fmt)
        if scale is None:
            raise HemaflowError(f"format {fmt.value} carries no calibration: pass --px-per-um (pixels per micrometre)")
        try:
            result = read_dataset(fmt, src)
        except (FileNotFoundError, ValueError) as exc:
            raise HemaflowError(str(exc)) from None
        files = [p for p in sorted(src.rglob("*")) if p.is_file()]
        with atomic_dir(raw_dir / name) as staging:
            for path in tqdm(files, desc=f"import {name}", unit="file"):
                target = staging / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        entry = {"name": name, "format": fmt.value, "path": name, "role": "source", "px_per_um": scale}
        typer.echo(
            f"{name}: {len(result.annotations)} cells, {len(result.background_images)} background images, "
            f"{sum(f.action == 'rejected' for f in result.findings)} rows rejected so far -> {raw_dir / name}\n"
            "Add to prepare.datasets in params.yaml (role: source, target or test):\n"
            + yaml.safe_dump([entry], sort_keys=False)
        )


@params_app.command("check")
def params_check(params_file: ParamsOption = Path("params.yaml")) -> None:
    """Validate params.yaml against the schema."""
    _load(params_file)
    typer.echo(f"{params_file}: valid")


def _flatten(prefix: str, value: object) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
    else:
        yield prefix, value


def _merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


@params_app.command("overrides")
def params_overrides(
    profile: Annotated[Path, typer.Argument(help="A partial params file, e.g. profiles/gpu.yaml.")],
    params_file: ParamsOption = Path("params.yaml"),
) -> None:
    """Print a profile as `-S key=value` arguments for `dvc exp run`, after validating the result.

    Example: dvc exp run $(hemaflow params overrides profiles/gpu.yaml)
    """
    with _user_errors():
        overlay = yaml.safe_load(profile.read_text()) or {}
        base = yaml.safe_load(params_file.read_text())
        parse_params(_merge(base, overlay), f"{params_file} + {profile}")
    pairs = [f"-S '{key}={yaml.safe_dump(value, default_flow_style=True).strip()}'" for key, value in _flatten("", overlay)]
    typer.echo(" ".join(p.replace("\n...", "") for p in pairs))
