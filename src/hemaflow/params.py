"""Typed, validated pipeline parameters: the one place where ``params.yaml`` is read.

Every section of ``params.yaml`` is a frozen pydantic model that rejects unknown keys, so a typo
fails at load time with the full key path (``prepare.crop.fov_um``) instead of being ignored.
Section names match the DVC stages that read them (``demo_data``, ``prepare``), and each stage's
``params:`` list in ``dvc.yaml`` names exactly the sections its command reads.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hemaflow.errors import HemaflowError

__all__ = [
    "AdaptationMethod",
    "AugmentParams",
    "Balance",
    "BaseParams",
    "ClassifyParams",
    "CropParams",
    "CycleGanParams",
    "DatasetFormat",
    "DatasetParams",
    "DemoDataParams",
    "DetectParams",
    "DetectorModelParams",
    "EnsembleMember",
    "FieldParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "Precision",
    "PredictParams",
    "PrepareParams",
    "Role",
    "TranslateParams",
    "load_params",
]

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ParamsError(HemaflowError):
    """params.yaml is missing, not YAML, or does not match the schema; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Section):
    """Shared by every stage."""

    seed: int = 42  # one seed for data generation, folds and training, so a run is repeatable


class DemoDataParams(_Section):
    """The synthetic demo datasets (``hemaflow demo-data``)."""

    cells_per_class: PositiveInt = 24  # single-cell images per class and stain domain
    fields_per_domain: PositiveInt = 40  # smear fields (1-3 white cells each) per domain
    background_fields: Fraction = 0.15  # share of smear fields with no white cell at all
    target_unlabelled_cells: PositiveInt = 96  # unlabelled target-domain cells for adaptation
    workers: PositiveInt = 2  # rendering processes; the output does not depend on it


class Role(str, Enum):
    """What a dataset is used for."""

    source = "source"  # labelled: trains detector and classifier
    target = "target"  # unlabelled target domain: only adaptation (stain translation) sees it
    test = "test"  # labelled, held out: evaluation only, never trained on


class DatasetFormat(str, Enum):
    """Native layouts that ``hemaflow data import`` and ``prepare`` read."""

    acevedo20 = "acevedo20"  # <class>/<PREFIX>_<n>.jpg, finer classes in prefixes
    matek19 = "matek19"  # <ABBR>/*.tiff (AML-Cytomorphology_LMU)
    hematologist = "hematologist"  # <common class>/* (Help a hematologist out, 11 classes)
    unlabelled = "unlabelled"  # any folder tree of single-cell images (WBC1/WBC2 DATA-VAL)
    cytologia = "cytologia"  # images/ + CSV NAME,x1,y1,x2,y2,class
    bccd = "bccd"  # Pascal VOC: JPEGImages/, Annotations/, ImageSets/Main/, labels.csv
    coco = "coco"  # annotations json + images
    segmentation_wbc = "segmentation_wbc"  # NNN.bmp + NNN.png mask + labels.csv


class DatasetParams(_Section):
    """One dataset taking part in ``prepare``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    format: DatasetFormat
    path: str  # relative to prepare.root
    role: Role
    px_per_um: PositiveFloat  # physical scale; real sources differ (Acevedo 10, Matek 13.8, WBC1 11.52)
    domain: str | None = None  # stain domain; defaults to the dataset name
    # Source label -> fine class (or null to drop the rows, reported); wins over classes.yaml.
    label_map: dict[str, str | None] = Field(default_factory=dict)
    subset: str | None = None  # an official split file to read (BCCD: ImageSets/Main/<subset>.txt)

    @property
    def domain_name(self) -> str:
        return self.domain or self.name


class CropParams(_Section):
    """Single-cell crops for the classifier and the translator."""

    fov_um: PositiveFloat = 25.0  # common physical field of view (the HIDA challenge used 25 um)
    pixels: PositiveInt = 64  # crop side in pixels after resampling: the classifier's input scale
    margin_px: Annotated[int, Field(ge=0)] = 16  # margin around a box, at the crop's scale


class FieldParams(_Section):
    """Smear fields for the detector."""

    px_per_um: PositiveFloat = 4.0  # the detector's pixel size: every field is resampled to it
    # Share of training fields without white cells. When the data has fewer, fields with cells are
    # copied with their cells painted out (Otsu mask + inpainting) until it is reached.
    min_background: Annotated[float, Field(ge=0, lt=1)] = 0.1


class PrepareParams(_Section):
    """Ingest, validate, unify classes, normalise scale, split (``hemaflow prepare``)."""

    root: str = "data/demo"  # folder the dataset paths are relative to (data/raw for real data)
    datasets: list[DatasetParams]
    folds: Annotated[int, Field(ge=2)] = 5
    val_fold: Annotated[int, Field(ge=0)] = 0  # fold used as validation by the training stages
    crop: CropParams = CropParams()
    fields: FieldParams = FieldParams()
    box_tolerance_px: Annotated[float, Field(ge=0)] = 8.0  # boxes this far outside are clipped
    max_pixels: PositiveInt = 40_000_000  # larger images are rejected before decoding
    workers: Annotated[int, Field(ge=0)] = 2  # processes decoding images (0 = in-process)

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetParams]) -> list[DatasetParams]:
        names = [d.name for d in datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique, repeated: {', '.join(duplicates)}")
        if not any(d.role is Role.source for d in datasets):
            raise ValueError("at least one dataset needs role 'source' (labelled training data)")
        return datasets

    @model_validator(mode="after")
    def _val_fold_exists(self) -> PrepareParams:
        if self.val_fold >= self.folds:
            raise ValueError(f"val_fold={self.val_fold} must be below folds={self.folds}")
        return self


class ModelParams(_Section):
    """The classifier's architecture (``train-classifier``, ``classify``)."""

    # Any exact timm.list_models() name, or a family alias (vit_large, vit_small, ...) resolved in
    # hemaflow.classify.model.BACKBONE_ALIASES; the resolved name is recorded with the metrics.
    backbone: str = "resnet18"
    img_size: Annotated[int, Field(ge=16)] = 64  # network input side; crops are resized to it
    checkpoint: str | None = None  # local .safetensors/.pth to start from; never a hub download
    drop_rate: Fraction = 0.0


class AugmentParams(_Section):
    """albumentations probabilities (0 disables a transform) and magnitudes."""

    hflip: Fraction = 0.5
    vflip: Fraction = 0.5
    rot90: Fraction = 0.5  # cells have no orientation
    affine: Fraction = 0.5
    scale_range: Annotated[float, Field(ge=0, lt=1)] = 0.1  # +-10 %: residual size differences
    brightness_contrast: Fraction = 0.3
    gamma: Fraction = 0.2
    hue_saturation: Fraction = 0.3  # stain variation between laboratories
    blur: Fraction = 0.1
    coarse_dropout: Fraction = 0.2
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables mixup
    cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0  # 0 disables cutmix


class Balance(str, Enum):
    """How heavy class imbalance is countered."""

    sampler = "sampler"  # class-balanced sampling of each epoch
    loss_weights = "loss_weights"  # inverse-frequency class weights in the loss
    none = "none"


class Precision(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class ClassifyParams(_Section):
    """Training of the cell classifier (``train-classifier``)."""

    folds: Annotated[int, Field(ge=1)] = 2  # fold models: prepare's folds 0..folds-1 held out in turn
    epochs: PositiveInt = 12
    batch_size: Annotated[int, Field(ge=2)] = 32
    lr: PositiveFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    balance: Balance = Balance.sampler
    augment: AugmentParams = AugmentParams()
    # Smear cells' training crops: centred on the detection with the best GIoU to the true box, as
    # at inference (the CytologIA winners' recipe; classify/crops.py), or on the true box.
    train_boxes: Literal["detected", "truth"] = "detected"
    min_match_giou: Annotated[float, Field(ge=-1, le=1)] = 0.5  # a worse best detection keeps the true box
    tta: list[Literal["hflip", "vflip"]] = Field(default_factory=lambda: ["hflip"])  # flips averaged at inference
    precision: Precision = Precision.bf16  # autocast on GPU; CPU always trains in fp32
    channels_last: bool = True  # on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0  # data-loading processes


class DetectorModelParams(_Section):
    """The detector's architecture; every one trains with a GIoU box loss."""

    arch: Literal["rtmdet", "yolox", "fcos", "faster_rcnn"] = "rtmdet"
    widen_factor: PositiveFloat = 0.375  # channel multiplier of CSPNeXt / CSPDarknet (rtmdet, yolox)
    deepen_factor: PositiveFloat = 0.167  # block-count multiplier (rtmdet, yolox)
    checkpoint: str | None = None  # local weights to start from (e.g. COCO-pretrained); random init otherwise


class DetectParams(_Section):
    """Training and inference of the white-cell detector (``train-detector``, ``detect``)."""

    model: DetectorModelParams = DetectorModelParams()
    input_px: Annotated[int, Field(ge=32, multiple_of=32)] = 160  # network input side (tiles above it)
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.004
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_iters: Annotated[int, Field(ge=0)] = 30
    color_augment: bool = True  # random brightness, contrast, saturation, hue: robustness to other stains
    score_threshold: Fraction = 0.3  # detections kept in the CSVs and used for matching
    tile_overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5  # of a tile's side: above the largest cell
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AdaptationMethod(str, Enum):
    """How labelled source cells are brought to the target domain's look before training."""

    none = "none"  # the source cells as they are
    reinhard = "reinhard"  # LAB mean/std matched to the target (Reinhard et al. 2001)
    macenko = "macenko"  # two-stain optical-density matching (Macenko et al. 2009)
    cyclegan = "cyclegan"  # unpaired image-to-image translation (Zhu et al. 2017)


class CycleGanParams(_Section):
    """The CycleGAN translator. Defaults are the reference recipe (junyanz/pytorch-CycleGAN-and-pix2pix);
    params.yaml sizes it down for the CPU demo and profiles/gpu.yaml brings it back."""

    img_size: Annotated[int, Field(ge=16, multiple_of=4)] = 256  # crops are resized to it for translation
    ngf: PositiveInt = 64  # generator filters in the first layer
    ndf: PositiveInt = 64  # discriminator filters in the first layer
    n_blocks: PositiveInt = 9  # residual blocks of the generator (6 for 128 px in the reference)
    upsample: Literal["transpose", "resize"] = "transpose"  # resize + conv avoids checkerboard artefacts
    epochs: PositiveInt = 100  # at the initial learning rate
    epochs_decay: Annotated[int, Field(ge=0)] = 100  # then linearly down to zero
    batch_size: PositiveInt = 1
    lr: PositiveFloat = 2e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.5
    lambda_cycle: Annotated[float, Field(ge=0)] = 10.0
    lambda_identity: Annotated[float, Field(ge=0)] = 0.5  # times lambda_cycle
    pool_size: Annotated[int, Field(ge=0)] = 50
    precision: Precision = Precision.bf16  # autocast on GPU; CPU trains in fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0


class TranslateParams(_Section):
    """Stain adaptation of the labelled source cells (``train-translator``, ``translate``)."""

    method: AdaptationMethod = AdaptationMethod.cyclegan  # the one `hemaflow predict` and the headline use
    methods: list[AdaptationMethod] = Field(default_factory=lambda: list(AdaptationMethod))  # compared side by side
    reference_cells: PositiveInt = 256  # target cells that Reinhard and Macenko are fitted on
    cyclegan: CycleGanParams = CycleGanParams()

    @model_validator(mode="after")
    def _method_is_compared(self) -> TranslateParams:
        if self.method not in self.methods:
            raise ValueError(f"translate.method={self.method.value} is not in translate.methods")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("translate.methods lists a method twice")
        return self


class EnsembleMember(_Section):
    path: str  # a model folder (models/detector, models/classifier/<method>, or a user's)
    weight: Annotated[float, Field(ge=0)] = 1.0


class PredictParams(_Section):
    """End-to-end prediction (``evaluate``, ``hemaflow predict``): detector(s), then classifier(s)."""

    extra_detectors: list[EnsembleMember] = Field(default_factory=list)  # boxes fused by weighted box fusion
    extra_classifiers: list[EnsembleMember] = Field(default_factory=list)  # probabilities averaged by weight
    wbf_iou: Annotated[float, Field(gt=0, lt=1)] = 0.55  # boxes overlapping more than this are fused
    batch_size: PositiveInt = 16  # images per detector batch and crops per classifier batch


class Params(_Section):
    """The whole params.yaml."""

    base: BaseParams = BaseParams()
    demo_data: DemoDataParams = DemoDataParams()
    prepare: PrepareParams
    model: ModelParams = ModelParams()
    classify: ClassifyParams = ClassifyParams()
    detect: DetectParams = DetectParams()
    translate: TranslateParams = TranslateParams()
    predict: PredictParams = PredictParams()

    @model_validator(mode="after")
    def _classifier_folds_exist(self) -> Params:
        if self.classify.folds > self.prepare.folds:
            raise ValueError(f"classify.folds={self.classify.folds} exceeds prepare.folds={self.prepare.folds}")
        return self


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see params.yaml in the repository for valid keys)"
    elif "input" in error and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return f"{key}: {message}"


def parse_params(data: object, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming every offending key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ParamsError(f"{source}: " + "; ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, str(path))
