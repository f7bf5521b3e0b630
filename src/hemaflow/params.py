"""Typed, validated pipeline parameters: the one place where ``params.yaml`` is read.

Every section is a frozen pydantic model that rejects unknown keys, so a typo fails at load
time with the full key path (``prepare.crop.fov_um``) instead of being ignored. This file holds
types, bounds and one docstring per key, and no values: ``params.yaml`` is the one place for
values (profiles under ``profiles/`` overlay it). Section names match the stages that read them,
and each stage's ``params:`` list in ``dvc.yaml`` names exactly the keys its command reads.
``hemaflow params docs`` turns these docstrings into ``docs/params.md``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hemaflow.errors import HemaflowError

__all__ = [
    "AdaptParams",
    "AugmentParams",
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
    "EvaluateParams",
    "FdaParams",
    "FieldParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "PredictParams",
    "PrepareParams",
    "Recipe",
    "Role",
    "StainAugmentParams",
    "TrainingCropParams",
    "Translation",
    "TranslateParams",
    "apply_profile",
    "load_params",
    "params_markdown",
    "parse_params",
    "replaces_collections",
]

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["bf16", "fp16", "fp32"]


class ParamsError(HemaflowError):
    """params.yaml is missing, not YAML, or does not match the schema; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BaseParams(_Section):
    """Shared by every stage."""

    seed: int
    """Seed of data generation, folds and bootstrap resampling: the same seed gives the same bytes."""
    seeds: Annotated[list[int], Field(min_length=1)]
    """Training seeds. The first seed's models are the pipeline's; each further seed trains the detector
    and the classifiers again, and metrics report mean and standard deviation across all seeds."""
    cpu_threads: PositiveInt
    """Threads of CPU math. Results are reproducible for a given count (it orders parallel sums); 2 on CI machines."""

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("a seed is listed twice")
        return seeds


class DemoDataParams(_Section):
    """The synthetic demo datasets (stage ``demo_data``)."""

    cells_per_class: PositiveInt
    """Single-cell images per class in each labelled source domain."""
    fields_per_domain: PositiveInt
    """Smear fields (1-3 white cells each) per domain."""
    background_fields: Fraction
    """Share of smear fields without any white cell."""
    target_unlabelled_cells: PositiveInt
    """Unlabelled target-domain cells, the only target images adaptation may look at."""
    target_test_cells: NonNegativeInt
    """Labelled single-cell target images held out for evaluation (sizes the confidence intervals)."""
    workers: PositiveInt
    """Rendering processes; the bytes written do not depend on it."""


class Role(str, Enum):
    """What a dataset is used for."""

    source = "source"  # labelled: trains detector and classifier
    target = "target"  # unlabelled target domain: only adaptation sees it
    target_labelled = "target_labelled"  # a small labelled slice of the target: few-shot training, choosing the method
    test = "test"  # labelled, held out: evaluation only, never trained on


class DatasetFormat(str, Enum):
    """Native layouts that ``hemaflow data import`` and ``prepare`` read."""

    acevedo20 = "acevedo20"  # <class>/<PREFIX>_<n>.jpg, finer classes in prefixes (PBC_dataset_normal_DIB too)
    matek19 = "matek19"  # <ABBR>/*.tiff (AML-Cytomorphology_LMU)
    hematologist = "hematologist"  # <common class>/* (Help a hematologist out, 11 classes)
    unlabelled = "unlabelled"  # any folder tree of single-cell images (WBC1/WBC2 DATA-VAL)
    cytologia = "cytologia"  # images/ + CSV NAME,x1,y1,x2,y2,class
    bccd = "bccd"  # Pascal VOC: JPEGImages/, Annotations/, ImageSets/Main/, labels.csv
    coco = "coco"  # annotations json + images
    segmentation_wbc = "segmentation_wbc"  # NNN.bmp + NNN.png mask + labels CSV (both datasets of the repository)
    hida = "hida"  # Help a hematologist out: Datasets/{Acevedo_20,Matek_19,WBC1,WBC2} (subset picks one)
    raabin = "raabin"  # Raabin-WBC: cropped cells {Train,TestA,TestB}/<Class>/*.jpg, or fields with <name>.json boxes
    lisc = "lisc"  # LISC: 720x576 fields in class folders + Ground Truth masks


class DatasetParams(_Section):
    """One dataset taking part in ``prepare``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name in cell ids, findings and metrics."""
    format: DatasetFormat
    """Native layout (see ``hemaflow data import --help``)."""
    path: str
    """Folder, relative to ``prepare.root``."""
    role: Role
    """source (labelled training data), target (unlabelled, adaptation only), target_labelled (a small labelled
    slice of the target: few-shot training and choosing the method) or test (labelled, evaluation only)."""
    px_per_um: PositiveFloat | Literal["auto"]
    """Physical scale in pixels per micrometre (Acevedo_20 10, Matek_19 13.8, WBC1 11.52); auto: estimated from red-cell diameters (recorded in metrics/data.json)."""
    domain: str | None = None
    """Stain domain (laboratory, scanner); several datasets may share one. Default: the dataset name."""
    label_map: dict[str, str | None] = Field(default_factory=dict)
    """Native label -> fine class, or null to drop the rows (reported); wins over classes.yaml."""
    subset: str | None = None
    """An official split file to read (BCCD: ImageSets/Main/<subset>.txt)."""
    part: tuple[Fraction, Fraction] | None = None
    """Keep only the images whose fixed pseudo-random position (a hash of the file name) lies in
    [start, end): two entries of one dataset with [0, 0.25] and [0.25, 1] split it into disjoint
    parts, e.g. a labelled target slice (role target_labelled) and the test split."""
    detector_boxes: bool = False
    """Role target only: the dataset's white-cell boxes (never its classes) also train the detector,
    its fields split into train and val folds like a source's. For a new lab that drew boxes on its
    smears but named no cell: the classifier still sees its cells unlabelled."""

    @field_validator("part")
    @classmethod
    def _ordered(cls, part: tuple[float, float] | None) -> tuple[float, float] | None:
        if part is not None and part[0] >= part[1]:
            raise ValueError(f"part [{part[0]}, {part[1]}]: start must be below end")
        return part

    @model_validator(mode="after")
    def _boxes_of_a_target(self) -> DatasetParams:
        if self.detector_boxes and self.role is not Role.target:
            raise ValueError(
                f"detector_boxes is for role target only, not {self.role.value} (a source's boxes always train the "
                "detector, a test or labelled slice's never do)"
            )
        return self

    @property
    def domain_name(self) -> str:
        return self.domain or self.name


class CropParams(_Section):
    """Single-cell crops for the classifier and the translator."""

    fov_um: PositiveFloat
    """Common physical field of view of a crop, in micrometres (the HIDA challenge used 25)."""
    pixels: PositiveInt
    """Crop side after resampling: the classifier's input scale is pixels / fov_um px/um."""
    margin_px: NonNegativeInt
    """Margin around a box at the crop's scale; a box that does not fit widens the field of view."""


class FieldParams(_Section):
    """Smear fields for the detector."""

    px_per_um: PositiveFloat
    """The detector's pixel size: every field is resampled to it."""
    min_background: Annotated[float, Field(ge=0, lt=1)]
    """Share of training fields without white cells; fields are copied with their cells painted out to reach it."""


class PrepareParams(_Section):
    """Ingest, validate and repair, unify classes, normalise scale, split (stage ``prepare``)."""

    root: str
    """Folder the dataset paths are relative to: data/demo (the demo) or data/raw (versioned by data.dvc)."""
    datasets: list[DatasetParams]
    """The datasets taking part."""
    folds: Annotated[int, Field(ge=2)]
    """Stratified folds of the labelled source images."""
    val_fold: NonNegativeInt
    """The fold the detector validates on (and the first classifier fold holds out)."""
    test_fold: NonNegativeInt | None
    """null, or a fold of the labelled source images held out as the test split (for data without a test set)."""
    crop: CropParams
    fields: FieldParams
    box_tolerance_px: Annotated[float, Field(ge=0)]
    """Boxes reaching this far outside their image are clipped; further ones are rejected."""
    duplicate_iou: Fraction
    """Two boxes of one image overlapping more than this are reported as one cell annotated twice."""
    max_pixels: PositiveInt
    """Larger images are rejected from their header, before decoding."""
    workers: NonNegativeInt
    """Processes decoding images (0: in-process)."""

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
        if self.test_fold is not None and (self.test_fold >= self.folds or self.test_fold == self.val_fold):
            raise ValueError(f"test_fold={self.test_fold} must be a fold below folds={self.folds} other than val_fold")
        return self


class TrainingCropParams(_Section):
    """Where the classifier's training crops of smear cells are cut (stage ``crop``)."""

    train_boxes: Literal["detected", "truth"]
    """detected: around the detection with the best GIoU to the true box, as at inference (CytologIA winners); truth: around the true box."""
    min_match_giou: Annotated[float, Field(ge=-1, le=1)]
    """A cell whose best detection has a lower GIoU keeps its true-box crop."""


class DetectorModelParams(_Section):
    """The detector's architecture; every one trains with a GIoU box loss."""

    arch: Literal["rtmdet", "yolox", "fcos", "faster_rcnn"]
    """MMDetection architecture."""
    widen_factor: PositiveFloat
    """Channel multiplier of CSPNeXt / CSPDarknet (rtmdet, yolox); 0.375 is RTMDet-tiny."""
    deepen_factor: PositiveFloat
    """Block-count multiplier (rtmdet, yolox); 0.167 is RTMDet-tiny."""
    checkpoint: str | None
    """Local weights to start from (e.g. COCO-pretrained); null: random initialisation."""


class DetectParams(_Section):
    """Training and inference of the white-cell detector (stages ``train_detector``, ``detect``)."""

    model: DetectorModelParams
    input_px: Annotated[int, Field(ge=32, multiple_of=32)]
    """Network input side; larger fields are tiled."""
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    """AdamW learning rate (linear warm-up, then cosine)."""
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_iters: NonNegativeInt
    color_augment: bool
    """Random brightness, contrast, saturation and hue in training: other stains look less foreign."""
    score_threshold: Fraction | Literal["auto"]
    """Boxes kept; auto: the threshold that maximises F1 at IoU 0.5 on the validation fields (recorded in the model card)."""
    tile_overlap: Annotated[float, Field(ge=0, lt=1)]
    """Overlap of neighbouring tiles, as a share of the tile side: must exceed the largest cell."""
    num_workers: NonNegativeInt
    """Data-loading processes."""
    device: Device


class Translation(str, Enum):
    """How labelled source cells are brought to the target domain's look before training."""

    none = "none"  # the source cells as they are
    reinhard = "reinhard"  # LAB mean/std matched to the target (Reinhard et al. 2001)
    macenko = "macenko"  # two-stain optical-density matching (Macenko et al. 2009)
    cyclegan = "cyclegan"  # unpaired image-to-image translation (Zhu et al. 2017): stage translate_cyclegan


class CycleGanParams(_Section):
    """The CycleGAN translator (stage ``train_translator``). The reference recipe
    (junyanz/pytorch-CycleGAN-and-pix2pix) is in profiles/gpu.yaml; params.yaml sizes it down for the CPU."""

    train: bool
    """Train it: needed by every adaptation method with translate: cyclegan; false skips the training (and its minutes)."""
    img_size: Annotated[int, Field(ge=16, multiple_of=4)]
    """Crops are resized to it for translation."""
    ngf: PositiveInt
    """Generator filters in the first layer (reference: 64)."""
    ndf: PositiveInt
    """Discriminator filters in the first layer (reference: 64)."""
    n_blocks: PositiveInt
    """Residual blocks of the generator (reference: 9; 6 for 128 px)."""
    upsample: Literal["transpose", "resize"]
    """transpose (the reference) or resize + conv (no checkerboard artefacts)."""
    epochs: PositiveInt
    """Epochs at the initial learning rate."""
    epochs_decay: NonNegativeInt
    """Then epochs with the rate falling linearly to zero."""
    batch_size: PositiveInt
    lr: PositiveFloat
    beta1: Annotated[float, Field(ge=0, lt=1)]
    """Adam's beta1 (reference: 0.5)."""
    lambda_cycle: Annotated[float, Field(ge=0)]
    """Weight of the cycle-consistency loss (reference: 10)."""
    lambda_identity: Annotated[float, Field(ge=0)]
    """Weight of the identity loss, times lambda_cycle (reference: 0.5)."""
    lambda_class: Annotated[float, Field(ge=0)]
    """Weight of the class-keeping loss: an auxiliary classifier, trained on the real labelled source
    cells, must still name each translated source cell's class (CyCADA's semantic consistency).
    Plain CycleGAN (0) may paint one class into another; real stain changes keep the class."""
    pool_size: NonNegativeInt
    """History of generated images the discriminators see (reference: 50)."""
    precision: Precision
    """Autocast on GPU; the CPU trains in fp32."""
    device: Device
    num_workers: NonNegativeInt


class TranslateParams(_Section):
    """Stain translation of the labelled source cells (stages ``translate``, ``train_translator``, ``translate_cyclegan``)."""

    methods: list[Translation]
    """Translations the translate stage runs (cyclegan has its own stage, after train_translator)."""
    reference_cells: PositiveInt
    """Target cells that Reinhard and Macenko are fitted on."""
    cyclegan: CycleGanParams

    @field_validator("methods")
    @classmethod
    def _classic_only(cls, methods: list[Translation]) -> list[Translation]:
        if Translation.cyclegan in methods:
            raise ValueError("cyclegan runs in its own stage (translate_cyclegan); list only none, reinhard, macenko")
        if len(set(methods)) != len(methods):
            raise ValueError("a translation is listed twice")
        return methods


class Recipe(_Section):
    """One adaptation method: a row of the cross-domain table. The parts combine freely."""

    translate: Translation
    """How the training cells are translated first."""
    augment: list[Literal["stain", "fda"]]
    """Training augmentation toward other labs: ``stain`` = strong stain, colour and scale jitter
    (classify.augment.stain); ``fda`` = Fourier domain adaptation, the low-frequency amplitude of a
    random unlabelled target cell swapped in (classify.augment.fda)."""
    adabn: bool
    """After training, re-estimate batch-norm statistics on the unlabelled target cells (AdaBN):
    no labels, seconds of compute; models without batch norm are left as they are."""
    self_training: Fraction | None
    """A second training round that adds the unlabelled target cells the first round's calibrated
    confidence puts at or above this value, with their predicted class; null: off."""
    few_shot: bool
    """Also train on the labelled target slice (datasets with role: target_labelled)."""
    few_shot_share: Fraction = 0.25
    """With few_shot: the share of each epoch's draws taken from the slice (class-balanced within
    it). A slice of a few dozen cells among a thousand source cells is otherwise drawn about as
    often as its size, and the model barely learns the target from it (README, real benchmark)."""
    domain_batch_norm: bool = False
    """With few_shot and adabn: in training, batch norm normalises the slice's cells by their own
    batch statistics and the source's by theirs, and only source cells move the running statistics
    (domain-specific batch norm); the target is then deployed as trained, with its own statistics.
    Off: one batch norm over the mixed batch. Needs one training process and no mixup or cutmix."""
    domain_heads: bool = False
    """With few_shot, an ``augment`` or a translation: a second classifier head learns the source cells
    as the source lab shows them (no slice cell, no augmentation or translation toward the target) and
    scores the source out of fold (saved in the method's ``source/`` folder, the model for the source
    lab), while the head that learns everything is deployed on the target. Off: one head for both,
    which the slice's labels and the target-like augmentations pull away from the source. Needs a
    trained head (not knn) and no mixup or cutmix."""
    augment_share: Fraction = 1.0
    """With an ``augment`` or a translation: the share of each epoch's source draws that get the
    augmentation and the translation toward the target; the others are drawn as the source lab shows
    them (untranslated, with classify.augment's jitter only), and with domain_heads they are the ones
    the source head learns. Below 1 with a translation, the source is also scored out of fold
    untranslated."""

    @field_validator("augment")
    @classmethod
    def _once_each(cls, augment: list[str]) -> list[str]:
        if len(set(augment)) != len(augment):
            raise ValueError("an augmentation is listed twice")
        return augment

    @model_validator(mode="after")
    def _augment_share_has_an_augment(self) -> Recipe:
        if self.augment_share < 1 and not self.toward_target:
            raise ValueError(
                f"augment_share={self.augment_share} has no augment or translation to share: list stain or fda "
                "in augment, set translate, or leave augment_share at 1"
            )
        if self.domain_heads and self.toward_target and self.augment_share == 1:
            raise ValueError(
                "domain_heads with an augment or a translation needs augment_share below 1: the source head "
                "learns the draws that are neither augmented nor translated"
            )
        return self

    @property
    def toward_target(self) -> bool:
        """Whether training cells are made to look like the target's (translated or augmented)."""
        return bool(self.augment) or self.translate is not Translation.none

    @property
    def needs_target(self) -> list[str]:
        """The parts of the recipe that look at unlabelled target cells."""
        parts = [f"augment {a}" for a in self.augment if a == "fda"]
        return parts + ["adabn"] * self.adabn + ["self_training"] * (self.self_training is not None)


class AdaptParams(_Section):
    """The adaptation methods compared side by side (stages ``train_classifier``, ``evaluate``, ``compare``)."""

    methods: dict[Annotated[str, Field(pattern=r"^[a-z0-9_]+$")], Recipe]
    """Name -> recipe; each gets a train_classifier and an evaluate stage."""
    deploy: str
    """The method `hemaflow predict` uses by default, or ``auto``: the one ``compare`` chose without
    test labels (best on the labelled target slice when there is one, else the most informative
    target predictions among the methods whose out-of-fold source macro-F1 is not significantly
    more than source_tolerance below none's; metrics/cross_domain.json)."""
    source_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.02
    """With deploy auto and no labelled target slice: a method is left out of the choice when the
    paired 95 % interval of its out-of-fold source macro-F1 minus none's lies wholly below
    -source_tolerance (it costs the source lab more than this, established). 0: any established
    cost leaves a method out."""

    @model_validator(mode="after")
    def _deployed_is_compared(self) -> AdaptParams:
        if self.deploy != "auto" and self.deploy not in self.methods:
            raise ValueError(f"deploy={self.deploy} is neither auto nor one of the methods ({', '.join(self.methods)})")
        return self


class ModelParams(_Section):
    """The classifier's architecture (stages ``train_classifier``; ``hemaflow classify``)."""

    backbone: str
    """Any exact timm.list_models() name or a family alias (vit_small, vit_large, ...; hemaflow.classify.model.BACKBONE_ALIASES)."""
    img_size: Annotated[int, Field(ge=16)]
    """Network input side; crops are resized to it."""
    checkpoint: str | None
    """Pretrained start: a `hemaflow weights get` folder (models/pretrained/NAME: built as its card says,
    checksum verified) or a local .safetensors/.pth; null: random initialisation. Never a download."""
    drop_rate: Fraction
    """Dropout before the classifier head."""


class StainAugmentParams(_Section):
    """The ``stain`` augmentation of an adaptation recipe: other labs' stains, cameras and scales."""

    p: Fraction
    """Probability of each of its transforms."""
    hed_scale: Annotated[float, Field(ge=0, lt=1)]
    """Haematoxylin/eosin intensity scaled by 1 +- this (albumentations HEStain; Tellez et al. 2019)."""
    hed_shift: Annotated[float, Field(ge=0, lt=1)]
    """... and shifted by +- this."""
    hue_shift: Annotated[int, Field(ge=0, le=180)]
    saturation_shift: Annotated[int, Field(ge=0, le=255)]
    scale_range: Annotated[float, Field(ge=0, lt=1)]
    """Scale jitter (+-): a lab's pixel size is never known exactly."""


class FdaParams(_Section):
    """The ``fda`` augmentation of an adaptation recipe (Yang and Soatto 2020, albumentations FDA)."""

    p: Fraction
    beta_limit: Annotated[float, Field(gt=0, le=0.5)]
    """Largest share of the spectrum (low frequencies) taken from the target cell."""
    reference_cells: PositiveInt
    """Unlabelled target cells the amplitudes are drawn from."""


class AugmentParams(_Section):
    """albumentations probabilities (0 disables a transform) and magnitudes."""

    hflip: Fraction
    vflip: Fraction
    rot90: Fraction
    """Cells have no orientation."""
    affine: Fraction
    scale_range: Annotated[float, Field(ge=0, lt=1)]
    """Scale jitter of the affine transform (+-): residual size differences between scanners."""
    brightness_contrast: Fraction
    gamma: Fraction
    hue_saturation: Fraction
    """Mild stain variation between laboratories."""
    blur: Fraction
    coarse_dropout: Fraction
    mixup_alpha: Annotated[float, Field(ge=0)]
    """0 disables mixup."""
    cutmix_alpha: Annotated[float, Field(ge=0)]
    """0 disables cutmix."""
    stain: StainAugmentParams
    fda: FdaParams


class ClassifyParams(_Section):
    """Training of the cell classifier (stage ``train_classifier``)."""

    folds: Annotated[int, Field(ge=1)]
    """Fold models: prepare's folds 0..folds-1 held out in turn (out-of-fold scores)."""
    epochs: PositiveInt
    batch_size: Annotated[int, Field(ge=2)]
    lr: PositiveFloat
    """AdamW learning rate (warm-up, then cosine to 1 %)."""
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_epochs: Annotated[float, Field(ge=0)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    balance: Literal["sampler", "loss_weights", "none"]
    """Class imbalance: class-balanced sampling, inverse-frequency loss weights, or nothing."""
    head: Literal["finetune", "linear_probe", "knn"]
    """finetune: every layer trains; linear_probe: only a new linear head on frozen features; knn: no
    training, each cell votes by its k nearest training cells in the frozen feature space (how
    foundation models such as DinoBloom are evaluated)."""
    layer_decay: Annotated[float, Field(gt=0, le=1)] | None
    """finetune: each layer's learning rate is this times the next one's, from the head down (timm); null: one rate."""
    freeze_epochs: NonNegativeInt
    """finetune: epochs at the start that train only the head (the backbone frozen), then everything."""
    knn_k: PositiveInt
    """knn: neighbours that vote (weights exp(cosine / 0.07), as in DINO's kNN evaluation)."""
    augment: AugmentParams
    tta: list[Literal["hflip", "vflip"]]
    """Flips averaged at inference."""
    precision: Precision
    """Autocast on GPU; the CPU trains in fp32."""
    channels_last: bool
    """Memory layout on GPU."""
    device: Device
    num_workers: NonNegativeInt
    """Data-loading processes."""


class EnsembleMember(_Section):
    path: str
    """A model folder (models/detector, models/classifier/<method>, or a user's)."""
    weight: Annotated[float, Field(ge=0)]


class PredictParams(_Section):
    """End to end: detector(s), then classifier(s) (stages ``detect``, ``evaluate``; ``hemaflow predict``)."""

    extra_detectors: list[EnsembleMember]
    """More detectors beside models/detector; all boxes fused by weighted box fusion."""
    extra_classifiers: list[EnsembleMember]
    """More classifiers; probabilities averaged by weight."""
    wbf_iou: Annotated[float, Field(gt=0, lt=1)]
    """Boxes of different detectors overlapping more than this are fused."""
    batch_size: PositiveInt
    """Images per detector batch and crops per classifier batch."""
    review_below: Fraction
    """Cells whose calibrated class confidence is below it are flagged `review` for a hematologist."""


class EvaluateParams(_Section):
    """Scoring (stages ``detect``, ``evaluate``, ``compare``)."""

    bootstrap: Annotated[int, Field(ge=100)]
    """Bootstrap resamples of the test images behind every confidence interval."""
    confidence: Annotated[float, Field(gt=0, lt=1)]
    """Level of the intervals (0.95)."""


class Params(_Section):
    """The whole params.yaml."""

    base: BaseParams
    demo_data: DemoDataParams
    prepare: PrepareParams
    crop: TrainingCropParams
    detect: DetectParams
    translate: TranslateParams
    adapt: AdaptParams
    model: ModelParams
    classify: ClassifyParams
    predict: PredictParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.classify.folds > self.prepare.folds:
            raise ValueError(f"classify.folds={self.classify.folds} exceeds prepare.folds={self.prepare.folds}")
        if self.prepare.test_fold is not None and self.prepare.test_fold < self.classify.folds:
            raise ValueError(
                f"prepare.test_fold={self.prepare.test_fold} is one of the classifier's folds 0..{self.classify.folds - 1}: "
                "hold out a later fold"
            )
        has_target = any(d.role is Role.target for d in self.prepare.datasets)
        baseline = self.adapt.methods.get("none")
        if baseline is None or baseline.translate is not Translation.none:
            raise ValueError(
                "adapt.methods needs `none: {translate: none}`: the baseline every method is compared with, "
                "whose classifier also checks that translations keep the class"
            )
        roles = {d.role for d in self.prepare.datasets}
        for name, recipe in self.adapt.methods.items():
            if recipe.needs_target and Role.target not in roles:
                raise ValueError(
                    f"adapt.methods.{name}: {', '.join(recipe.needs_target)} need(s) unlabelled target cells "
                    "(a dataset with role: target)"
                )
            if recipe.few_shot and Role.target_labelled not in roles:
                raise ValueError(f"adapt.methods.{name}.few_shot needs a dataset with role: target_labelled")
            if recipe.few_shot and self.classify.folds < 2:
                raise ValueError(
                    f"adapt.methods.{name}.few_shot needs classify.folds >= 2: each fold model trains on the slice "
                    "cells that another holds out to score it"
                )
            if recipe.domain_batch_norm and not (recipe.few_shot and recipe.adabn):
                raise ValueError(
                    f"adapt.methods.{name}.domain_batch_norm needs few_shot and adabn: the slice is normalised by "
                    "target statistics in training, so the deployed model needs the target's (AdaBN)"
                )
            if recipe.domain_heads and not (recipe.few_shot or recipe.toward_target):
                raise ValueError(
                    f"adapt.methods.{name}.domain_heads needs few_shot, an augment or a translation: the source "
                    "head is the one without the slice and without the augmentation or translation toward the target"
                )
            if recipe.domain_heads and self.classify.head == "knn":
                raise ValueError(
                    f"adapt.methods.{name}.domain_heads needs a trained head: set classify.head to finetune or linear_probe"
                )
            mixing = self.classify.augment.mixup_alpha or self.classify.augment.cutmix_alpha
            for option in ("domain_batch_norm", "domain_heads"):
                if getattr(recipe, option) and mixing:
                    raise ValueError(
                        f"adapt.methods.{name}.{option}: mixup and cutmix blend source and target cells; "
                        "set classify.augment.mixup_alpha and cutmix_alpha to 0"
                    )
            if recipe.translate is not Translation.cyclegan and recipe.translate not in self.translate.methods:
                raise ValueError(f"adapt.methods.{name}.translate={recipe.translate.value} is not in translate.methods")
            if recipe.translate is Translation.cyclegan and not self.translate.cyclegan.train:
                raise ValueError(f"adapt.methods.{name} translates with cyclegan: set translate.cyclegan.train: true")
        needs_target = [t.value for t in self.translate.methods if t is not Translation.none]
        if self.translate.cyclegan.train:
            needs_target.append("cyclegan")
        if needs_target and not has_target:
            raise ValueError(
                f"translate: {', '.join(needs_target)} adapt(s) to a target domain, but no dataset has role: target "
                "(give one, or set translate.methods: [none] and translate.cyclegan.train: false)"
            )
        return self

    @property
    def translations(self) -> list[str]:
        """Every translation the pipeline writes: ``translate.methods``, then cyclegan when it is trained."""
        return [t.value for t in self.translate.methods] + (["cyclegan"] if self.translate.cyclegan.train else [])


def _is_collection(path: tuple[str, ...]) -> bool:
    """Is the key at ``path`` a list or a name -> section dict (replaced whole by a profile, never merged)?"""
    model: type[BaseModel] = Params
    for depth, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:
            return False
        annotation = field.annotation
        if get_origin(annotation) in (list, dict):
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)) or depth == len(path) - 1:
            return False
        model = annotation
    return False


def apply_profile(base: dict, overlay: dict, path: tuple[str, ...] = ()) -> dict:
    """``base`` (a params mapping, changed in place and returned) with a profile's values: sections merge
    key by key; lists and name -> section dicts (``prepare.datasets``, ``adapt.methods``) are replaced whole."""
    for key, value in overlay.items():
        inner = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not _is_collection(inner):
            apply_profile(base[key], value, inner)
        else:
            base[key] = value
    return base


def replaces_collections(overlay: dict, path: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys of a profile that replace a list or a name -> section dict."""
    found = []
    for key, value in overlay.items():
        inner = (*path, key)
        if _is_collection(inner):
            found.append(".".join(inner))
        elif isinstance(value, dict):
            found += replaces_collections(value, inner)
    return found


def _type_name(annotation: object) -> str:
    name = getattr(annotation, "__name__", None)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(member.value for member in annotation)
    text = name if name and not getattr(annotation, "__args__", None) else str(annotation)
    for noise in ("typing.", "hemaflow.params.", "pathlib."):
        text = text.replace(noise, "")
    return text.replace("Literal[", "one of [").replace("'", "")


def _bounds(field: object) -> str:
    marks = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "multiple of"}
    found = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in marks.items() if hasattr(m, key)]
    return ", ".join(found)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for key, field in model.model_fields.items():
        path = f"{prefix}{key}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{path}.")
            continue
        inner = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:  # a list or a dict of sections: its entries' keys
            description = (field.description or "").replace("\n", " ")
            rows.append(
                f"| `{path}` | {'list' if get_origin(annotation) is list else 'name ->'} entries |  | {description} |"
            )
            rows += _rows(inner[0], f"{path}[]." if get_origin(annotation) is list else f"{path}.<name>.")
            continue
        cells = [f"`{path}`", _type_name(annotation), _bounds(field), (field.description or "").replace("\n", " ")]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def params_markdown() -> str:
    """The reference of every params.yaml key, generated from this schema (``hemaflow params docs``)."""
    lines = [
        "# params.yaml reference",
        "",
        "Generated by `hemaflow params docs` from `src/hemaflow/params.py`; a test keeps it current.",
        "Values live in `params.yaml` (every key must be given there) and in the profiles under `profiles/`.",
        "",
    ]
    for key, field in Params.model_fields.items():
        section = field.annotation
        lines += [
            f"## `{key}`",
            "",
            (section.__doc__ or "").strip().replace("\n", " "),
            "",
            "| key | type | bounds | meaning |",
            "|---|---|---|---|",
            *_rows(section, f"{key}."),
            "",
        ]
    return "\n".join(lines)


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; docs/params.md lists every key)"
    elif error["type"] == "missing":
        message = "missing (params.yaml must give every key; docs/params.md lists them)"
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
