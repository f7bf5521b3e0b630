"""The whole mmengine/mmdet config, built in one function from our params (no ``_base_`` files).

Single class ``wbc``; every architecture regresses boxes with a GIoU loss. Plain literals only,
so that ``Config.pretty_text`` works and the config saved beside the model is readable.
"""

from __future__ import annotations

from pathlib import Path

from hemaflow.params import DetectorModelParams, DetectParams

__all__ = ["CLASSES", "build_config", "model_config", "test_pipeline"]

CLASSES = ("wbc",)
_BN = {"type": "BN"}
_PREPROCESSOR = {
    "type": "DetDataPreprocessor",
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "bgr_to_rgb": True,
    "pad_size_divisor": 32,
}
# RTMDet's and FCOS's inference: every box above 0.001 after NMS; `detect` applies the chosen threshold.
_DENSE_HEAD_TEST = {
    "nms_pre": 1000,
    "min_bbox_size": 0,
    "score_thr": 0.001,
    "nms": {"type": "nms", "iou_threshold": 0.6},
    "max_per_img": 100,
}


def _channels(base: int, widen: float) -> int:
    return max(int(base * widen) // 8 * 8, 8)


def _rtmdet(m: DetectorModelParams) -> dict:
    c3, c4, c5 = (_channels(b, m.widen_factor) for b in (256, 512, 1024))
    neck = _channels(256, m.widen_factor)
    silu = {"type": "SiLU", "inplace": True}
    return {
        "type": "RTMDet",
        "data_preprocessor": _PREPROCESSOR,
        "backbone": {
            "type": "CSPNeXt",
            "arch": "P5",
            "expand_ratio": 0.5,
            "deepen_factor": m.deepen_factor,
            "widen_factor": m.widen_factor,
            "channel_attention": True,
            "norm_cfg": _BN,
            "act_cfg": silu,
        },
        "neck": {
            "type": "CSPNeXtPAFPN",
            "in_channels": [c3, c4, c5],
            "out_channels": neck,
            "num_csp_blocks": 1,
            "expand_ratio": 0.5,
            "norm_cfg": _BN,
            "act_cfg": silu,
        },
        "bbox_head": {
            "type": "RTMDetSepBNHead",
            "num_classes": len(CLASSES),
            "in_channels": neck,
            "stacked_convs": 2,
            "feat_channels": neck,
            "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]},
            "bbox_coder": {"type": "DistancePointBBoxCoder"},
            "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0, "loss_weight": 1.0},
            "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
            "with_objectness": False,
            "exp_on_reg": False,
            "share_conv": True,
            "pred_kernel_size": 1,
            "norm_cfg": _BN,
            "act_cfg": silu,
        },
        "train_cfg": {
            "assigner": {"type": "DynamicSoftLabelAssigner", "topk": 13},
            "allowed_border": -1,
            "pos_weight": -1,
            "debug": False,
        },
        "test_cfg": _DENSE_HEAD_TEST,
        "use_syncbn": False,  # SyncBN comes from the runner's sync_bn, on CUDA only (build_config)
    }


def _yolox(m: DetectorModelParams) -> dict:
    c3, c4, c5 = (_channels(b, m.widen_factor) for b in (256, 512, 1024))
    neck = _channels(256, m.widen_factor)
    bn = {"type": "BN", "momentum": 0.03, "eps": 0.001}
    swish = {"type": "Swish"}
    return {
        "type": "YOLOX",
        "data_preprocessor": _PREPROCESSOR,
        "backbone": {
            "type": "CSPDarknet",
            "deepen_factor": m.deepen_factor,
            "widen_factor": m.widen_factor,
            "out_indices": (2, 3, 4),
            "norm_cfg": bn,
            "act_cfg": swish,
        },
        "neck": {
            "type": "YOLOXPAFPN",
            "in_channels": [c3, c4, c5],
            "out_channels": neck,
            "num_csp_blocks": 1,
            "norm_cfg": bn,
            "act_cfg": swish,
        },
        "bbox_head": {
            "type": "YOLOXHead",
            "num_classes": len(CLASSES),
            "in_channels": neck,
            "feat_channels": neck,
            "stacked_convs": 2,
            "strides": (8, 16, 32),
            "norm_cfg": bn,
            "act_cfg": swish,
            "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": True, "reduction": "sum", "loss_weight": 1.0},
            # YOLOX's default IoU loss, swapped for GIoU as everywhere else in hemaflow
            "loss_bbox": {"type": "GIoULoss", "eps": 1e-16, "reduction": "sum", "loss_weight": 5.0},
            "loss_obj": {"type": "CrossEntropyLoss", "use_sigmoid": True, "reduction": "sum", "loss_weight": 1.0},
            "loss_l1": {"type": "L1Loss", "reduction": "sum", "loss_weight": 1.0},
        },
        "train_cfg": {"assigner": {"type": "SimOTAAssigner", "center_radius": 2.5}},
        "test_cfg": {"score_thr": 0.001, "nms": {"type": "nms", "iou_threshold": 0.6}},
    }


def _resnet18_fpn(out_channels: int, num_outs: int, start_level: int, extra: str | bool) -> tuple[dict, dict]:
    backbone = {
        "type": "ResNet",
        "depth": 18,
        "num_stages": 4,
        "out_indices": (0, 1, 2, 3),
        "frozen_stages": -1,
        "norm_cfg": _BN,
        "norm_eval": False,
        "style": "pytorch",
    }
    neck = {
        "type": "FPN",
        "in_channels": [64, 128, 256, 512],
        "out_channels": out_channels,
        "start_level": start_level,
        "add_extra_convs": extra,
        "num_outs": num_outs,
    }
    return backbone, neck


def _fcos(m: DetectorModelParams) -> dict:
    backbone, neck = _resnet18_fpn(128, 3, 1, "on_output")
    return {
        "type": "FCOS",
        "data_preprocessor": _PREPROCESSOR,
        "backbone": backbone,
        "neck": neck | {"relu_before_extra_convs": True},
        "bbox_head": {
            "type": "FCOSHead",
            "num_classes": len(CLASSES),
            "in_channels": 128,
            "stacked_convs": 2,
            "feat_channels": 128,
            "strides": [8, 16, 32],
            "regress_ranges": ((-1, 64), (64, 128), (128, 100000000.0)),
            "norm_on_bbox": True,
            "centerness_on_reg": True,
            "center_sampling": True,
            "conv_bias": True,
            "loss_cls": {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
            "loss_bbox": {"type": "GIoULoss", "loss_weight": 1.0},
            "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
        },
        "test_cfg": _DENSE_HEAD_TEST,
    }


def _faster_rcnn(m: DetectorModelParams) -> dict:
    backbone, neck = _resnet18_fpn(128, 5, 0, False)
    delta_coder = {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [0.1, 0.1, 0.2, 0.2]}
    return {
        "type": "FasterRCNN",
        "data_preprocessor": _PREPROCESSOR,
        "backbone": backbone,
        "neck": neck,
        "rpn_head": {
            "type": "RPNHead",
            "in_channels": 128,
            "feat_channels": 128,
            "anchor_generator": {
                "type": "AnchorGenerator",
                "scales": [8],
                "ratios": [0.5, 1.0, 2.0],
                "strides": [4, 8, 16, 32, 64],
            },
            "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
            "reg_decoded_bbox": True,
            "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
            "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        },
        "roi_head": {
            "type": "StandardRoIHead",
            "bbox_roi_extractor": {
                "type": "SingleRoIExtractor",
                "out_channels": 128,
                "featmap_strides": [4, 8, 16, 32],
                "roi_layer": {"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0},
            },
            "bbox_head": {
                "type": "Shared2FCBBoxHead",
                "in_channels": 128,
                "fc_out_channels": 256,
                "roi_feat_size": 7,
                "num_classes": len(CLASSES),
                "bbox_coder": delta_coder,
                "reg_class_agnostic": False,
                "reg_decoded_bbox": True,  # the GIoU loss needs decoded boxes
                "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
                "loss_bbox": {"type": "GIoULoss", "loss_weight": 10.0},
            },
        },
        "train_cfg": {
            "rpn": {
                "assigner": {
                    "type": "MaxIoUAssigner",
                    "pos_iou_thr": 0.7,
                    "neg_iou_thr": 0.3,
                    "min_pos_iou": 0.3,
                    "match_low_quality": True,
                    "ignore_iof_thr": -1,
                },
                "sampler": {
                    "type": "RandomSampler",
                    "num": 256,
                    "pos_fraction": 0.5,
                    "neg_pos_ub": -1,
                    "add_gt_as_proposals": False,
                },
                "allowed_border": -1,
                "pos_weight": -1,
                "debug": False,
            },
            "rpn_proposal": {
                "nms_pre": 2000,
                "max_per_img": 1000,
                "nms": {"type": "nms", "iou_threshold": 0.7},
                "min_bbox_size": 0,
            },
            "rcnn": {
                "assigner": {
                    "type": "MaxIoUAssigner",
                    "pos_iou_thr": 0.5,
                    "neg_iou_thr": 0.5,
                    "min_pos_iou": 0.5,
                    "match_low_quality": False,
                    "ignore_iof_thr": -1,
                },
                "sampler": {
                    "type": "RandomSampler",
                    "num": 256,
                    "pos_fraction": 0.25,
                    "neg_pos_ub": -1,
                    "add_gt_as_proposals": True,
                },
                "pos_weight": -1,
                "debug": False,
            },
        },
        "test_cfg": {
            "rpn": {
                "nms_pre": 1000,
                "max_per_img": 1000,
                "nms": {"type": "nms", "iou_threshold": 0.7},
                "min_bbox_size": 0,
            },
            "rcnn": {"score_thr": 0.001, "nms": {"type": "nms", "iou_threshold": 0.5}, "max_per_img": 100},
        },
    }


_ARCHITECTURES = {"rtmdet": _rtmdet, "yolox": _yolox, "fcos": _fcos, "faster_rcnn": _faster_rcnn}


def model_config(model: DetectorModelParams) -> dict:
    return _ARCHITECTURES[model.arch](model)


def test_pipeline(input_px: int) -> list[dict]:
    # LoadAnnotations after Resize keeps ground truth in original coordinates for the metric.
    return [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": (input_px, input_px), "keep_ratio": True},
        {"type": "Pad", "size": (input_px, input_px), "pad_val": {"img": (114, 114, 114)}},
        {"type": "LoadAnnotations", "with_bbox": True},
        {"type": "PackDetInputs", "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")},
    ]


def _dataset(prepared: Path, split: str, pipeline: list[dict], train: bool) -> dict:
    return {
        "type": "CocoDataset",
        "data_root": str(prepared),
        "ann_file": f"coco/{split}.json",
        "data_prefix": {"img": ""},
        "metainfo": {"classes": CLASSES},
        "filter_cfg": {"filter_empty_gt": False, "min_size": 0},  # background fields teach what is no cell
        "pipeline": pipeline,
        "test_mode": not train,
    }


def build_config(
    *, params: DetectParams, seed: int, prepared: Path, work_dir: Path, launcher: str = "none", device: str = "cpu"
) -> dict:
    """The complete runner config: model, data, schedule, evaluation, hooks, runtime."""
    size = params.input_px
    train_pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "with_bbox": True},
        *([{"type": "PhotoMetricDistortion"}] if params.color_augment else []),
        {"type": "RandomResize", "scale": (size, size), "ratio_range": (0.8, 1.25), "keep_ratio": True},
        {"type": "RandomCrop", "crop_size": (size, size), "allow_negative_crop": True},
        {"type": "RandomFlip", "prob": 0.5, "direction": ["horizontal", "vertical"]},
        {"type": "Pad", "size": (size, size), "pad_val": {"img": (114, 114, 114)}},
        {"type": "PackDetInputs"},
    ]
    loader = {"num_workers": params.num_workers, "persistent_workers": params.num_workers > 0}
    evaluator = {
        "type": "CocoMetric",
        "ann_file": str(prepared / "coco" / "val.json"),
        "metric": "bbox",
        "format_only": False,
    }
    warmup = min(params.warmup_iters, 1000)
    config = {
        "default_scope": "mmdet",
        "model": model_config(params.model),
        "train_dataloader": loader
        | {
            "batch_size": params.batch_size,
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "batch_sampler": {"type": "AspectRatioBatchSampler"},
            "dataset": _dataset(prepared, "train", train_pipeline, train=True),
        },
        "val_dataloader": loader
        | {
            "batch_size": params.batch_size,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "dataset": _dataset(prepared, "val", test_pipeline(size), train=False),
        },
        "val_evaluator": evaluator,
        "train_cfg": {"type": "EpochBasedTrainLoop", "max_epochs": params.epochs, "val_interval": 1},
        "val_cfg": {"type": "ValLoop"},
        "optim_wrapper": {
            "type": "OptimWrapper",
            "optimizer": {"type": "AdamW", "lr": params.lr, "weight_decay": params.weight_decay},
            "paramwise_cfg": {"norm_decay_mult": 0.0, "bias_decay_mult": 0.0, "bypass_duplicate": True},
            "clip_grad": {"max_norm": 35.0, "norm_type": 2},
        },
        "param_scheduler": [
            {"type": "LinearLR", "start_factor": 0.01, "by_epoch": False, "begin": 0, "end": warmup},
            {
                "type": "CosineAnnealingLR",
                "eta_min": params.lr * 0.05,
                "begin": 0,
                "end": params.epochs,
                "T_max": params.epochs,
                "by_epoch": True,
                "convert_to_iter_based": True,
            },
        ],
        "default_hooks": {
            "timer": {"type": "IterTimerHook"},
            "logger": {"type": "LoggerHook", "interval": 10},
            "param_scheduler": {"type": "ParamSchedulerHook"},
            "checkpoint": {
                "type": "CheckpointHook",
                "interval": 1,
                "max_keep_ckpts": 1,
                "save_best": "coco/bbox_mAP",
                "rule": "greater",
            },
            "sampler_seed": {"type": "DistSamplerSeedHook"},
        },
        "env_cfg": {"cudnn_benchmark": False, "dist_cfg": {"backend": "nccl" if device == "cuda" else "gloo"}},
        # SyncBatchNorm exists only on CUDA; the runner converts every architecture's BN under DDP there
        **({"sync_bn": "torch"} if device == "cuda" else {}),
        "randomness": {"seed": seed, "deterministic": False},
        "vis_backends": [{"type": "LocalVisBackend"}],
        "visualizer": {
            "type": "DetLocalVisualizer",
            "vis_backends": [{"type": "LocalVisBackend"}],
            "name": "visualizer",
        },
        "log_processor": {"type": "LogProcessor", "window_size": 10, "by_epoch": True},
        "log_level": "WARNING",
        "work_dir": str(work_dir),
        "load_from": params.model.checkpoint,
        "resume": True,
        "launcher": launcher,
    }
    if launcher != "none":  # DDP that accepts CPU modules (gloo) as well as GPU ones (hemaflow.detect.train)
        config["model_wrapper_cfg"] = {
            "type": "DeviceAwareDDP",
            "broadcast_buffers": False,
            "find_unused_parameters": params.model.arch == "faster_rcnn",
        }
    return config
