"""Instance segmentation: a box, a class and a mask per object; COCO mask mAP; MGD on the FPN levels.

Models are a YOLACT mask branch on torchvision's FCOS (:mod:`pipeline.tasks.instance_segmentation.models`:
prototype masks and per-location coefficients, every output of a fixed shape); every runtime's
raw outputs go through one decode → NMS → mask assembly
(:mod:`pipeline.tasks.instance_segmentation.post`) before COCO's box and mask mAP.

The MGD settings are the authors' instance segmentation ones (yzd-v/MGD ``det/``, SOLO): one
MGD loss with its own generation block on each of the first four FPN levels, a pixel mask with
λ = 0.65, α = 2e-5 (here ``"auto"``: their α fits 1333×800 inputs), the distilled student's neck
and heads initialised from the teacher's (``init_student``, on by default), gradients clipped at
max-norm 35.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.tasks.base import Metric, Source, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.data import DataBundle
    from pipeline.schema import Config, DataConfig, KDConfig, OptimConfig

log = logging.getLogger(__name__)

_COCO_NEEDS = ("train_images, train_annotations, val_images and val_annotations (image folders and COCO "
               "instances JSON files with segmentation polygons or RLE)")
# Parity: a reference detection this confident must be found again: same class, box IoU ≥ 0.9,
# and its mask at mask IoU ≥ 0.9 in the input frame.
PARITY_SCORE, PARITY_IOU = 0.3, 0.9


class _MaskMAP:
    """Decodes each batch with the shared post-processing, assembles the masks in each original
    image, then COCO box and mask mAP."""

    def __init__(self, task: "InstanceSegmentation", num_classes: int):
        from pipeline.tasks.common.coco_eval import CocoMAP

        self.task = task
        self.coco = CocoMAP([str(c) for c in range(num_classes)], masks=True)

    def update(self, outputs: dict[str, np.ndarray], targets: Any) -> None:
        from pipeline.tasks.instance_segmentation.post import original_rles

        dets = self.task.postprocess(outputs)
        preds = [{**d, "rles": original_rles(d, t, self.task.image_size)} for d, t in zip(dets, targets, strict=True)]
        self.coco.update(preds, targets)

    def compute(self) -> dict[str, float]:
        return self.coco.compute()


class InstanceSegmentation(Task):
    """``(image, {boxes, labels, masks, rles, ...})`` items; a model returning fixed-shape raw
    outputs (boxes, scores, mask coefficients per location, and prototype masks)."""

    name = "instance_segmentation"
    quality = (Metric("mask_map", "mask mAP"), Metric("mask_map_50", "mask mAP@50"), Metric("map", "box mAP"))
    history_metric = "mask_map"
    agreement = "mask_agreement"
    sources = (
        Source("scenes", about="digit scenes composed from scikit-learn's digits (embedded), a box and a mask per digit"),
        Source("coco", {k: _COCO_NEEDS for k in ("train_images", "train_annotations", "val_images", "val_annotations")},
               about="COCO instances JSON files (segmentation polygons or RLE) and their image folders"),
    )
    default_pair = ("yolact_resnet34_fpn", "yolact_resnet18_fpn")
    model_options = ("fpn_channels",)
    # The authors' SOLO recipe starts the student from every teacher weight outside the backbone.
    init_student_prefixes = ("backbone.fpn.", "head.", "proto.")
    init_student_default = True
    mgd_defaults = {"alpha": "auto", "mask_ratio": 0.65, "mask": "pixel"}
    # Detection's recipe (AdamW lr 1e-3 with warm-up, batch 8, gradients clipped at max-norm 35
    # as the authors' instance configs): SGD learns next to nothing from scratch on a few hundred images.
    recipe = {"optim": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
                        "grad_clip": 35.0},
              "batch_size": 8, "heal_lr": 5e-4}
    kd_defaults = {"temperature": 1.0, "weight": 1.0}
    int8_fp32_outputs = True  # class, box, coefficient and prototype output convs in FP

    def __init__(self, image_size: int = 0):
        from pipeline.tasks.instance_segmentation.models import OUTPUT_NAMES

        self.image_size = image_size
        self.output_names = OUTPUT_NAMES

    def bind(self, cfg: "Config") -> "InstanceSegmentation":
        """This task for a run: decoding uses FCOS's locations at ``[data] image_size``."""
        if self.image_size == cfg.data.image_size:
            return self
        return InstanceSegmentation(cfg.data.image_size)

    def _stand_in(self, num_classes: int) -> tuple[Any, Any]:
        from pipeline.tasks.common.detectors import stand_in

        if not self.image_size:
            raise RuntimeError("the instance segmentation task must be bound to a run's config (bind) before decoding")
        return stand_in("fcos", self.image_size, num_classes)

    # -- data ------------------------------------------------------------------------------
    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        from pipeline.tasks.instance_segmentation.data import check_data

        check_data(cfg, base_dir)

    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        from pipeline.tasks.instance_segmentation.data import load_data

        return load_data(cfg, seed, base_dir)

    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """Letterboxed to ``S×S`` and normalised, as the COCO reader makes its images."""
        from pipeline.tasks.common.letterbox import LetterboxTransform

        return LetterboxTransform(cfg.image_size, cfg.mean, cfg.std)

    # -- models ----------------------------------------------------------------------------
    def check_arch(self, arch: str) -> None:
        from pipeline.tasks.instance_segmentation.models import check_inst_arch

        check_inst_arch(arch)

    def build_model(self, arch: str, num_classes: int, *, image_size: int, weights: str = "",
                    base_dir: Path = Path("."), fpn_channels: int = 256) -> "nn.Module":
        from pipeline.tasks.instance_segmentation.models import build_inst_model

        return build_inst_model(arch, num_classes, image_size=image_size, weights=weights, base_dir=base_dir,
                                fpn_channels=fpn_channels)

    def default_layers(self, arch: str) -> list[str]:
        """The first four FPN levels (P3-P6), one MGD loss each, as the authors' SOLO taps."""
        from pipeline.tasks.instance_segmentation.models import MGD_LEVELS

        return [f"fpn_taps.{level}" for level in MGD_LEVELS]

    def prune_keep(self, model: "nn.Module") -> list[str]:
        """The output convs (classes, box, centre-ness, coefficients) and the prototype net's last
        conv: their channel counts are classes, box coordinates and the K coefficients a mask pairs."""
        return list(model.head_layers)

    # -- training --------------------------------------------------------------------------
    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        import torch

        return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                for t in targets]

    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        """torchvision's FCOS loss on the box outputs plus YOLACT's mask loss (``loss.py``)."""
        import torch

        from pipeline.tasks.instance_segmentation.loss import MASK_WEIGHT, box_losses, mask_loss

        head = {k: v.float() for k, v in self.named_outputs(out).items()}
        model, detector = self._stand_in(head["cls_logits"].shape[-1])
        anchors = torch.from_numpy(np.array(model.anchors)).to(head["cls_logits"].device)
        boxes = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets]
        box_head = {k: head[k] for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
        losses, matched = box_losses(detector, boxes, box_head, anchors, list(model.level_sizes))
        return sum(losses.values()) + MASK_WEIGHT * mask_loss(head["mask_coeffs"], head["protos"], matched, targets)

    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """Logit KD on the class scores, location by location: binary cross-entropy to the teacher's
        sigmoid scores at temperature T, × T², averaged over locations (as detection's)."""
        import torch.nn.functional as F

        t = cfg.temperature
        s = self.named_outputs(student_out)["cls_logits"].float() / t
        te = self.named_outputs(teacher_out)["cls_logits"].float() / t
        n, a = s.shape[:2]
        return F.binary_cross_entropy_with_logits(s, te.sigmoid(), reduction="sum") * (t * t) / (n * a)

    # -- evaluation ------------------------------------------------------------------------
    def evaluator(self, num_classes: int) -> _MaskMAP:
        return _MaskMAP(self, num_classes)

    def postprocess(self, outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detections per image (boxes in input pixels, scores, labels, masks at the prototypes'
        resolution) by the shared decode + NMS (``post.decode_instances``)."""
        from pipeline.tasks.common.box_decode import POSTPROCESS
        from pipeline.tasks.instance_segmentation.post import decode_instances

        model, _ = self._stand_in(np.asarray(outputs["cls_logits"]).shape[-1])
        return decode_instances(outputs, model.anchors, image_size=self.image_size, level_sizes=model.level_sizes,
                                **POSTPROCESS)

    def _agreement(self, reference: Any, candidate: Any) -> float:
        """Share of confident reference detections (score ≥ 0.3) found again by the candidate:
        same class, box IoU ≥ 0.9 (one to one) and mask IoU ≥ 0.9 in the input frame; counted over
        the larger of the two confident sets. 1.0 when neither has a confident detection."""
        from pipeline.tasks.common.coco_eval import box_pairs
        from pipeline.tasks.instance_segmentation.post import input_masks, mask_iou

        agreed, total = 0, 0
        for ref, cand in zip(reference, candidate, strict=True):
            r, c = ref["scores"] >= PARITY_SCORE, cand["scores"] >= PARITY_SCORE
            total += max(int(r.sum()), int(c.sum()))
            pairs = box_pairs(ref["boxes"][r], ref["labels"][r], cand["boxes"][c], cand["labels"][c], PARITY_IOU)
            if not pairs:
                continue
            ref_masks = input_masks({k: v[r] for k, v in ref.items()}, self.image_size)
            cand_masks = input_masks({k: v[c] for k, v in cand.items()}, self.image_size)
            agreed += sum(mask_iou(ref_masks[i], cand_masks[j]) >= PARITY_IOU for i, j in pairs)
        return 1.0 if total == 0 else agreed / total


TASK = InstanceSegmentation()
