"""The ``train_classifier`` stage: k-fold timm classifiers on the (translated) training crops.

For each of ``classify.folds`` folds, the labelled source cells of the other folds train a model
and the held-out fold gives out-of-fold (OOF) predictions; the fold models together are the
ensemble that evaluation and ``hemaflow predict`` use. AdamW with a warm-up + cosine schedule
(timm), albumentations, optional mixup/cutmix, class-balanced sampling or loss weights,
bf16/fp16 autocast and channels_last on GPU, reproducible on CPU. Each fold model's temperature
is fitted on its own held-out fold (calibration; the test split is never seen here). Training
state is saved after every epoch but the last (``hemaflow.resume``), so an interrupted run resumes. Under
``torchrun`` the model runs in DistributedDataParallel (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.classify.adapt import (
    DomainHeads,
    adapt_batch_norm,
    average_thresholded_confidence,
    confident_pseudo_labels,
    domain_heads_loss,
    forward_per_domain,
    information_maximization,
)
from hemaflow.classify.data import (
    CellDataset,
    EpochSampler,
    Indexed,
    build_transform,
    class_weights,
    with_adapted_copies,
    with_slice_share,
)
from hemaflow.classify.inference import fold_logits, predict_logits
from hemaflow.classify.model import (
    KnnClassifier,
    ModelCard,
    create_classifier,
    pretrained_start,
    resolve_backbone,
    save_classifier,
)
from hemaflow.data.classes import load_class_matrix
from hemaflow.errors import HemaflowError
from hemaflow.metrics import SPREAD_KEYS, across_seeds, classification_metrics, expected_calibration_error
from hemaflow.params import ClassifyParams, ModelParams, Recipe, Translation
from hemaflow.resume import TrainingState, file_digest, fingerprint
from hemaflow.runtime import Runtime, autocast, conditions, seed_folder
from hemaflow.tables import labelled, read_cells, read_crop

__all__ = ["fit_temperature", "train_classifier"]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017)."""
    logits_t, labels_t = torch.from_numpy(logits).double(), torch.from_numpy(labels).long()

    def nll(log_t: float) -> float:
        return float(nn.functional.cross_entropy(logits_t / np.exp(log_t), labels_t))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.from_numpy(logits / temperature).softmax(1).numpy()


def _fit_fold(
    job: _Job, fold: int, train: pd.DataFrame, val: pd.DataFrame, state: TrainingState
) -> tuple[nn.Module, nn.Module, ModelCard, list[dict], float | None]:
    """Train one fold on ``train`` (``path``, ``fine_class`` and ``role`` columns; ``adapted_path`` where a
    translation's draws are shared), resuming a matching saved state; return the model, the model that
    scores the source (the same one unless the recipe has domain heads), card, history (validation on
    ``val``), images/s."""
    model_params, params, seed, runtime, classes = job.model_params, job.params, job.seed, job.runtime, job.classes
    torch.manual_seed(seed + fold)
    index = {c: i for i, c in enumerate(classes)}
    model, card = create_classifier(model_params, len(classes), params.head, params.knn_k)
    card = replace(card, classes=classes)
    cuda = runtime.device.type == "cuda"
    model.to(
        runtime.device, memory_format=torch.channels_last if cuda and params.channels_last else torch.preserve_format
    )
    train_labels = [index[c] for c in train["fine_class"]]
    plain = build_transform(card.img_size, card.mean, card.std, None)
    if params.head == "knn":
        model, card = _fit_knn(job, model, card, CellDataset(list(train["path"]), train_labels, plain))
        return model, model, card, [], None
    augment = build_transform(card.img_size, card.mean, card.std, params.augment, job.recipe.augment)
    # the files drawn adapted toward the target: translations where they are shared, else the cells themselves
    adapted = train["adapted_path"].fillna(train["path"]) if "adapted_path" in train else train["path"]
    cells = CellDataset(list(adapted), train_labels, augment, job.references)
    val_set = CellDataset(list(val["path"]), [index[c] for c in val["fine_class"]], plain)
    weights = class_weights(train_labels, len(classes))
    sample_weights = weights[train_labels] if params.balance == "sampler" else None
    from_slice = (train["role"] == "target_labelled").to_numpy()
    if from_slice.any():
        sample_weights = with_slice_share(sample_weights, train_labels, from_slice, job.recipe.few_shot_share)
    # the cells the source head must not learn (with domain heads): the slice's and the augmented copies
    not_for_source_head = from_slice
    transforms = [augment]  # each reseeded per epoch
    if job.recipe.augment_share < 1:  # some draws as the source shows them
        as_shown = build_transform(card.img_size, card.mean, card.std, params.augment)
        transforms.append(as_shown)
        cells = ConcatDataset([CellDataset(list(train["path"]), train_labels, as_shown), cells])
        sample_weights = with_adapted_copies(
            torch.ones(len(train)) if sample_weights is None else sample_weights, from_slice, job.recipe.augment_share
        )
        from_slice = np.concatenate([from_slice, from_slice])  # the slice's copies are never drawn
        not_for_source_head = np.concatenate([not_for_source_head, np.ones(len(train), bool)])
    # each batch also says which rows it holds: the slice's cells among them
    train_set = Indexed(cells)
    per_domain = job.recipe.domain_batch_norm and from_slice.any()
    heads = DomainHeads(model) if job.recipe.domain_heads and not_for_source_head.any() else None
    trained = heads or model  # what the loop runs, saves and resumes
    if per_domain and runtime.world_size > 1:
        raise HemaflowError(
            "classify: domain_batch_norm runs two forward passes per step, which DistributedDataParallel "
            "does not allow; train it on one process"
        )
    sampler = EpochSampler(len(train), seed + fold, sample_weights, runtime.rank, runtime.world_size)
    per_process_batch = max(params.batch_size // runtime.world_size, 2)
    loader = DataLoader(
        train_set,
        per_process_batch,
        sampler=sampler,
        num_workers=params.num_workers,
        drop_last=True,
        pin_memory=cuda,
        persistent_workers=params.num_workers > 0,
    )
    val_loader = DataLoader(val_set, 2 * per_process_batch, num_workers=params.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise HemaflowError(f"classify: fold {fold} has {len(train_set)} training cells, fewer than one batch")
    optimizer = create_optimizer_v2(
        model, "adamw", lr=params.lr, weight_decay=params.weight_decay, layer_decay=params.layer_decay
    )
    if heads is not None:  # before the scheduler, which records every group's starting rate
        optimizer.add_param_group({"params": list(heads.source_head.parameters())})
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=params.epochs * steps_per_epoch,
        lr_min=params.lr * 0.01,
        warmup_t=round(params.warmup_epochs * steps_per_epoch),
        warmup_lr_init=params.lr * 0.01,
        t_in_epochs=False,
    )
    mixing = params.augment.mixup_alpha > 0 or params.augment.cutmix_alpha > 0
    mixup = (
        Mixup(
            params.augment.mixup_alpha,
            params.augment.cutmix_alpha,
            label_smoothing=params.label_smoothing,
            num_classes=len(classes),
        )
        if mixing
        else None
    )
    loss_weights = weights.to(runtime.device) if params.balance == "loss_weights" else None
    criterion = (
        SoftTargetCrossEntropy()
        if mixing
        else nn.CrossEntropyLoss(loss_weights, label_smoothing=params.label_smoothing)
    )
    scaler = torch.amp.GradScaler(enabled=cuda and params.precision == "fp16")

    start, history = 0, []
    saved = state.load(runtime.device)
    if saved is not None:
        trained.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, history = saved["epoch"], saved["history"]
        if runtime.main and start < params.epochs:
            print(f"fold {fold}: resuming after epoch {start}")

    seconds, seen, network, frozen = 0.0, 0, model, None
    for epoch in range(start, params.epochs):
        wanted = params.head == "linear_probe" or epoch < params.freeze_epochs
        if wanted != frozen:  # DDP registers only parameters that need gradients: wrap again on a change
            frozen = wanted
            _freeze_backbone(model, frozen)
            network = DistributedDataParallel(trained) if runtime.world_size > 1 else trained
        sampler.set_epoch(epoch)
        for copy, transform in enumerate(transforms):  # the copies' jitter streams differ
            transform.set_random_seed(seed * 1_000 + fold * 100 + epoch + copy * 1_000_003)
        np.random.seed(seed * 1_000 + fold * 100 + epoch)  # timm's Mixup draws from numpy's global RNG
        torch.manual_seed(seed * 1_000 + fold * 100 + epoch)
        network.train()
        if frozen:  # frozen features: batch-norm statistics stay as pretrained, too
            model.eval()
            model.get_classifier().train()
        losses, tick = [], time.perf_counter()
        bar = tqdm(
            loader, desc=f"fold {fold} epoch {epoch + 1}/{params.epochs}", unit="batch", disable=not runtime.main
        )
        for step, (images, labels, rows) in enumerate(bar):
            images = images.to(runtime.device, non_blocking=True)
            if cuda and params.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(runtime.device, non_blocking=True)
            slice_rows = torch.from_numpy(from_slice[rows.numpy()]).to(runtime.device)
            source_head_skips = torch.from_numpy(not_for_source_head[rows.numpy()]).to(runtime.device)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with autocast(runtime.device, params.precision):
                outputs = forward_per_domain(network, images, slice_rows) if per_domain else network(images)
                if heads is None:
                    loss = criterion(outputs.float(), labels)
                else:
                    loss = domain_heads_loss(outputs.float(), labels, source_head_skips, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        seconds += time.perf_counter() - tick
        seen += len(losses) * per_process_batch * runtime.world_size
        # the source head's logits are the last columns (all of them without domain heads): no copy per epoch
        logits = predict_logits(trained, val_loader, runtime.device)[:, -len(classes) :]
        predicted = [classes[i] for i in logits.argmax(1)]
        scores = classification_metrics(list(val["fine_class"]), predicted)
        truth = torch.tensor([index[c] for c in val["fine_class"]])
        val_loss = nn.functional.cross_entropy(torch.from_numpy(logits), truth).item()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_macro_f1": scores["macro_f1"],
                "val_balanced_accuracy": scores["balanced_accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        # after the last epoch the model itself is saved next: its state (weights and optimizer moments,
        # 3.6 GB for a ViT-Large) would only be written to be deleted
        if runtime.main and epoch + 1 < params.epochs:
            state.save(
                {
                    "epoch": epoch + 1,
                    "history": history,
                    "model": trained.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
            )
        runtime.barrier()
    return model, model if heads is None else heads.source_model(), card, history, (seen / seconds if seconds else None)


def _freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Only the classifier head trains when ``frozen`` (linear probe, or finetune's warm-up); else every layer."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(not frozen or id(parameter) in head)


def _fit_knn(job: _Job, backbone: nn.Module, card: ModelCard, train_set: CellDataset) -> tuple[nn.Module, ModelCard]:
    """The kNN head: the training cells' frozen features become the bank that votes."""
    tick = time.perf_counter()
    features = predict_logits(backbone, DataLoader(train_set, 64), job.runtime.device)
    model = KnnClassifier(backbone, len(features), len(job.classes), job.params.knn_k).to(job.runtime.device)
    model.remember(torch.from_numpy(features), torch.tensor(train_set.labels))
    if job.runtime.main:
        print(f"knn: {len(features)} training cells embedded in {time.perf_counter() - tick:.1f} s")
    return model, replace(card, knn={"cells": len(features), "k": job.params.knn_k})


@dataclass(frozen=True)
class _Job:
    """What every fold of one seed's training shares."""

    model_params: ModelParams
    params: ClassifyParams
    recipe: Recipe
    seed: int
    classes: list[str]
    target: pd.DataFrame  # unlabelled target cells (``path``): AdaBN, self-training, the accuracy estimate
    references: list[np.ndarray]  # target cells at the input size, for the fda augmentation
    data_hash: str
    runtime: Runtime


def train_classifier(
    *,
    model_params: ModelParams,
    params: ClassifyParams,
    recipe: Recipe,
    seeds: list[int],
    cells: Path,
    crops: Path,
    prepared: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    state: Path,
) -> None:
    """Train the fold models of one adaptation method; write models, metrics and plots.

    The labelled source cells of ``cells/cells.csv`` (a translation's output) train; where a translating
    recipe shares its draws (augment_share below 1), the untranslated ``crops`` (the crop stage's) are
    the cells as the source lab shows them, drawn beside the translated ones and scored out of fold.
    The target cells of ``prepared`` serve the recipe (unlabelled ones for fda, AdaBN and
    self-training, the labelled slice for few-shot training) and the scores that choose a method
    without test labels.
    The first seed's fold models (``out/fold*``) are the pipeline's; every further seed trains the
    same folds again (``out/seeds/seed<s>``) so that metrics can report the spread across seeds.
    ``state`` keeps per-epoch training states so that an interrupted run resumes.
    """
    runtime = Runtime.start(params.device, "classify.device")
    source = _with_paths(labelled(read_cells(cells, "translate"), "source"), cells)
    if source.empty:
        raise HemaflowError(f"{cells / 'cells.csv'}: no labelled source cells to train on")
    if recipe.translate is not Translation.none and recipe.augment_share < 1:
        source = _beside_untranslated(source, crops)
    everything = read_cells(prepared)
    target = _with_paths(everything[everything["role"] == "target"], prepared)
    few_shot = _with_paths(labelled(everything, "target_labelled"), prepared)
    if recipe.needs_target and target.empty:
        raise HemaflowError(f"{prepared / 'cells.csv'}: no target cells for {', '.join(recipe.needs_target)}")
    classes = sorted(set(source["fine_class"]) | (set(few_shot["fine_class"]) if recipe.few_shot else set()))
    data_hash = fingerprint(file_digest(cells / "cells.csv"), file_digest(prepared / "cells.csv"))
    out.mkdir(parents=True, exist_ok=True)
    if runtime.main:
        _remove_stale_models(out, params.folds, seeds, recipe.domain_heads)
    runs = {}
    for seed in seeds:
        references = _references(target, params, model_params.img_size, seed) if "fda" in recipe.augment else []
        job = _Job(model_params, params, recipe, seed, classes, target, references, data_hash, runtime)
        curves = plots / "curves" if seed == seeds[0] else None
        runs[seed] = _train_folds(job, source, few_shot, seed_folder(out, seed, seeds), curves, state / f"seed{seed}")
    if runtime.main:
        first = runs[seeds[0]]
        spread = {
            seed: classification_metrics(list(r.oof["fine_class"]), list(r.oof["predicted"]))
            for seed, r in runs.items()
        }
        _report(classes, first, spread, model_params, recipe, out, metrics, plots)
        for seed in seeds:
            for fold in range(params.folds):
                for round_ in ("", ".self_training"):
                    TrainingState(state / f"seed{seed}" / f"fold{fold}{round_}.state.pt", "").clear()
    runtime.barrier()


def _with_paths(cells: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """``cells`` with ``path``: each crop's file (crops are relative to the folder of their table)."""
    return cells.assign(path=[folder / c for c in cells["crop"]])


def _beside_untranslated(translated: pd.DataFrame, crops: Path) -> pd.DataFrame:
    """The translated source cells with ``path`` set to each cell's untranslated crop (in ``crops``, the
    crop stage's output: what the source lab shows) and ``adapted_path`` to its translation."""
    untranslated = _with_paths(read_cells(crops, "crop"), crops).set_index("cell_id")["path"]
    missing = sorted(set(translated["cell_id"]) - set(untranslated.index))
    if missing:
        raise HemaflowError(f"{crops / 'cells.csv'}: no untranslated crop for translated cell(s) {missing[:5]}")
    return translated.assign(adapted_path=translated["path"], path=list(untranslated[translated["cell_id"]]))


def _references(target: pd.DataFrame, params: ClassifyParams, img_size: int, seed: int) -> list[np.ndarray]:
    """A fixed random draw of unlabelled target cells at the network input size (fda's amplitudes)."""
    chosen = np.random.default_rng(seed).permutation(len(target))[: params.augment.fda.reference_cells]
    return [
        cv2.resize(read_crop(target["path"].iloc[i]), (img_size, img_size), interpolation=cv2.INTER_AREA)
        for i in sorted(chosen)
    ]


def _remove_stale_models(out: Path, folds: int, seeds: list[int], domain_heads: bool) -> None:
    """Fold models of folds, seeds or source heads no longer asked for must not join an ensemble or the spread."""
    for folder in [out, *(out / "seeds").glob("seed*")]:
        if folder != out and folder not in {seed_folder(out, s, seeds) for s in seeds}:
            shutil.rmtree(folder)
            continue
        if not domain_heads and (folder / "source").exists():
            shutil.rmtree(folder / "source")
        for stale in [*folder.glob("fold*"), *(folder / "source").glob("fold*")]:
            if int(stale.name[4:].split(".")[0]) >= folds:
                stale.unlink()


@dataclass
class _Run:
    """One seed's fold models, as measured."""

    oof: pd.DataFrame | None = None  # source cells, each predicted by the fold model that held it out
    few_shot: pd.DataFrame | None = None  # the labelled target slice, likewise
    deployed_calls: list[str] = field(default_factory=list)  # the oof cells as the deployed fold models call them
    fold_scores: dict = field(default_factory=dict)
    speeds: list[float] = field(default_factory=list)
    target_probabilities: list[np.ndarray] = field(default_factory=list)  # per fold, calibrated
    pseudo_labels: dict = field(default_factory=dict)  # per fold: target cells added by self-training
    adapted_layers: int = 0  # batch-norm layers AdaBN re-estimated, per model


def _probabilities(job: _Job, model: nn.Module, card: ModelCard, paths: list[Path], temperature: float) -> np.ndarray:
    """Calibrated class probabilities of one model for crop files (N x classes)."""
    if not paths:
        return np.zeros((0, len(job.classes)))
    return _softmax(_logits(job, model, card, paths), temperature)


def _train_folds(
    job: _Job, source: pd.DataFrame, few_shot: pd.DataFrame, out: Path, curves: Path | None, state: Path
) -> _Run:
    """One seed's fold models, saved in ``out`` (learning curves in ``curves``, if given)."""
    params, recipe, runtime, classes = job.params, job.recipe, job.runtime, job.classes
    run, oof_parts, few_shot_parts = _Run(), [], []
    # every slice cell is held out by exactly one fold model, even where prepare made more folds
    slice_fold = few_shot["fold"] % params.folds
    for fold in range(params.folds):
        train, val = source[source["fold"] != fold], source[source["fold"] == fold]
        if val.empty:
            raise HemaflowError(f"classify: fold {fold} has no labelled source cells; lower classify.folds")
        if recipe.few_shot:
            train = pd.concat([train, few_shot[slice_fold != fold]])
        key = fingerprint(
            job.model_params.model_dump(),
            params.model_dump(exclude={"num_workers", "device"}),
            recipe.model_dump(exclude={"adabn"}),
            job.seed,
            fold,
            job.data_hash,
        )
        model, source_model, card, history, speed = _fit_fold(
            job, fold, train, val, TrainingState(state / f"fold{fold}.state.pt", key)
        )
        if recipe.self_training is not None:  # a second round with the confident target cells, labelled as predicted
            first_round = _probabilities(job, model, card, list(job.target["path"]), 1.0)
            rows, labels = confident_pseudo_labels(first_round, classes, recipe.self_training)
            run.pseudo_labels[str(fold)] = len(rows)
            pseudo = job.target.iloc[rows].assign(fine_class=labels)
            model, source_model, card, history, speed = _fit_fold(
                job,
                fold,
                pd.concat([train, pseudo]),
                val,
                TrainingState(state / f"fold{fold}.self_training.state.pt", fingerprint(key, list(rows), labels)),
            )
        if speed is not None:
            run.speeds.append(speed)
        if not runtime.main:
            continue
        truth = np.array([classes.index(c) for c in val["fine_class"]])
        logits = _logits(job, source_model, card, list(val["path"]))
        temperature = fit_temperature(logits, truth)
        predicted = [classes[i] for i in logits.argmax(1)]
        run.fold_scores[str(fold)] = classification_metrics(list(val["fine_class"]), predicted)
        raw, calibrated = _softmax(logits), _softmax(logits, temperature)
        oof_parts.append(val.assign(predicted=predicted, confidence_raw=raw.max(1), confidence=calibrated.max(1)))
        extra = _card_extra(job, fold, run.fold_scores[str(fold)], history)
        deployed_calls = predicted
        if recipe.domain_heads:  # the source lab's models; the target's is calibrated on its own calls
            stem = out / "source" / f"fold{fold}"
            save_classifier(source_model.cpu(), replace(card, temperature=temperature, extra=extra), stem)
            source_model.to(runtime.device)
            if source_model is not model:  # a fold whose training drew no slice cell has one model
                logits = _logits(job, model, card, list(val["path"]))
                temperature = fit_temperature(logits, truth)
                deployed_calls = [classes[i] for i in logits.argmax(1)]
        run.deployed_calls += deployed_calls
        if recipe.adabn:  # the saved model is the one deployed on the target: its statistics
            plain = build_transform(card.img_size, card.mean, card.std, None)
            target_set = CellDataset(list(job.target["path"]), [0] * len(job.target), plain)
            run.adapted_layers = adapt_batch_norm(model, DataLoader(target_set, 64), runtime.device)
        run.target_probabilities.append(_probabilities(job, model, card, list(job.target["path"]), temperature))
        held_out = few_shot[slice_fold == fold]
        slice_probabilities = _probabilities(job, model, card, list(held_out["path"]), temperature)
        few_shot_parts.append(held_out.assign(predicted=[classes[i] for i in slice_probabilities.argmax(1)]))
        save_classifier(model.cpu(), replace(card, temperature=temperature, extra=extra), out / f"fold{fold}")
        model.to(runtime.device)
        if curves is not None and history:  # a kNN head has no training curve
            write_csv(curves / f"fold{fold}.csv", pd.DataFrame(history))
    if oof_parts:
        run.oof, run.few_shot = pd.concat(oof_parts), pd.concat(few_shot_parts)
    return run


def _card_extra(job: _Job, fold: int, val: dict, history: list[dict]) -> dict:
    """What a saved fold model's card records of its training."""
    return {
        "fold": fold,
        "seed": job.seed,
        "val": val,
        "history": history,
        "model_params": job.model_params.model_dump(),
        "classify_params": job.params.model_dump(mode="json"),
        "recipe": job.recipe.model_dump(mode="json"),
    }


def _logits(job: _Job, model: nn.Module, card: ModelCard, paths: list[Path]) -> np.ndarray:
    return fold_logits([(model, card)], paths, job.params.tta, job.runtime.device)[0]


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and cell count (a reliability diagram's data)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = [
        {
            "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "cells": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]
    return pd.DataFrame(rows, columns=["bin", "confidence", "accuracy", "cells"])


def _report(
    classes: list[str],
    run: _Run,
    spread: dict[int, dict],
    model_params: ModelParams,
    recipe: Recipe,
    out: Path,
    metrics: Path,
    plots: Path,
) -> None:
    """Out-of-fold metrics and calibration of the first seed's fold models, the spread of the out-of-fold
    scores across seeds (``spread``: each seed's scores), what the adaptation did and the scores that
    choose a method without test labels; confusion and reliability data for DVC."""
    oof = run.oof
    matrix = load_class_matrix()
    scores = classification_metrics(list(oof["fine_class"]), list(oof["predicted"]))
    correct = (oof["fine_class"] == oof["predicted"]).to_numpy(float)
    target_probabilities = np.mean(run.target_probabilities, axis=0) if len(run.target_probabilities[0]) else None
    target_confidence = None if target_probabilities is None else target_probabilities.max(1)
    few_shot = run.few_shot
    write_json(
        metrics,
        {
            "backbone": model_params.backbone,
            "resolved_backbone": resolve_backbone(model_params.backbone),
            "pretrained": pretrained_start(model_params.checkpoint),
            "classes": len(classes),
            "recipe": recipe.model_dump(mode="json"),
            "oof": _summary(scores) | {"cells": len(oof)},
            "calibration": {
                "ece_before": expected_calibration_error(oof["confidence_raw"].to_numpy(), correct),
                "ece_after": expected_calibration_error(oof["confidence"].to_numpy(), correct),
                "note": "temperatures fitted on these out-of-fold cells; metrics/evaluate holds the test split's ECE",
            },
            "folds": {k: _summary(v) for k, v in run.fold_scores.items()},
            "seeds": {key: across_seeds({seed: v[key] for seed, v in spread.items()}) for key in SPREAD_KEYS},
            "adaptation": {
                "target_cells": 0 if target_confidence is None else len(target_confidence),
                "adabn_layers": run.adapted_layers,
                "self_training_cells": run.pseudo_labels,
                # domain heads: what the model deployed on the target would cost the source out of fold
                "deployed_model_oof_macro_f1": classification_metrics(list(oof["fine_class"]), run.deployed_calls)[
                    "macro_f1"
                ]
                if recipe.domain_heads
                else None,
            },
            # how compare chooses a method without test labels (never read here: no test cell is loaded)
            "selection": {
                "atc_target_accuracy": None
                if target_confidence is None
                else average_thresholded_confidence(oof["confidence"].to_numpy(), correct, target_confidence),
                # over coarse groups, as the headline score: fine classes the target may lack split no group
                "target_information": None
                if target_probabilities is None
                else information_maximization(target_probabilities, matrix.coarse(classes)),
                "target_labelled_cells": len(few_shot),
                # coarse groups, as the headline target score: a slice's fine labels are often
                # coarser than the source's (a "neutrophil" is neither segmented nor band)
                "target_labelled_coarse_macro_f1": classification_metrics(
                    matrix.coarse(few_shot["fine_class"]), matrix.coarse(few_shot["predicted"])
                )["macro_f1"]
                if len(few_shot)
                else None,
            },
            "train_images_per_second": float(np.mean(run.speeds)) if run.speeds else None,  # None: all resumed
            "conditions": conditions(),
        },
    )
    confusion = oof[["fine_class", "predicted"]].rename(columns={"fine_class": "actual"})
    write_csv(plots / "confusion.csv", confusion.sort_values(["actual", "predicted"], kind="stable"))
    write_csv(plots / "reliability.csv", reliability(oof["confidence"].to_numpy(), correct))
    write_csv(out / "oof.csv", oof[["cell_id", "fine_class", "predicted", "confidence", "domain", "fold"]])


def _summary(scores: dict) -> dict:
    return {
        "macro_f1": scores["macro_f1"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "accuracy": scores["accuracy"],
        "per_class_f1": {label: v["f1"] for label, v in scores["per_class"].items()},
    }
