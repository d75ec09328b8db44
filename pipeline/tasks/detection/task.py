"""Object detection: boxes and classes, COCO mAP, MGD on every FPN level.

Models are torchvision detectors by name (:mod:`pipeline.tasks.common.detectors`) returning their raw
head outputs at one fixed input size; training uses torchvision's own losses for those outputs
(focal + L1 for RetinaNet, focal + GIoU + centerness for FCOS, hard-negative-mined CE + smooth
L1 for SSDlite); every runtime's raw outputs go through one decode + NMS
(:func:`pipeline.tasks.common.box_decode.decode`, settings in :data:`POSTPROCESS`) before COCO mAP.

The MGD settings are the authors' detection ones (yzd-v/MGD `det/`): one MGD loss with its own
generation block per FPN output level, a pixel mask with λ = 0.65, α = 2e-5, summed.

Decoding depends on the detector family (RetinaNet, FCOS, SSDlite) and the input size: the
task is bound to a run's config (:meth:`Detection.bind`), and the teacher and the student must
be of one family (MGD pairs their FPN levels; ``init_student`` copies the neck and head).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.tasks.base import Metric, Source, Task
from pipeline.tasks.common.box_decode import POSTPROCESS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.schema import Config, DataConfig, KDConfig, OptimConfig
    from pipeline.data import DataBundle

log = logging.getLogger(__name__)

# What `[data] source = "coco"` needs set.
_COCO_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")
_COCO_NEEDS = "train_images, train_annotations, val_images and val_annotations (image folders and COCO instances JSON files)"
# Parity: a reference detection this confident must be found again (same class, IoU >= 0.9).
PARITY_SCORE, PARITY_IOU = 0.3, 0.9


class _MAP:
    """Decodes each batch of raw outputs with the shared post-processing, then COCO mAP."""

    def __init__(self, task: "Detection", num_classes: int):
        from pipeline.tasks.common.coco_eval import CocoMAP

        self.task = task
        self.coco = CocoMAP([str(c) for c in range(num_classes)])

    def update(self, outputs: dict[str, np.ndarray], targets: Any) -> None:
        self.coco.update(self.task.postprocess(outputs), targets)

    def compute(self) -> dict[str, float]:
        return self.coco.compute()


class Detection(Task):
    """``(image, {boxes, labels, ...})`` items; a model returning raw head outputs (see detmodels)."""

    name = "detection"
    quality = (Metric("map", "mAP"), Metric("map_50", "mAP@50"))
    history_metric = "map"
    agreement = "box_agreement"
    output_names = ("cls_logits", "bbox_regression")  # RetinaNet's and SSD's; FCOS adds bbox_ctrness (bound)
    sources = (
        Source("scenes", about="digit scenes composed from scikit-learn's digits (embedded), a box per digit"),
        Source("coco", dict.fromkeys(_COCO_KEYS, _COCO_NEEDS),
               about="COCO instances JSON files and their image folders"),
    )
    default_pair = ("fcos_resnet34_fpn", "fcos_resnet18_fpn")
    model_options = ("fpn_channels",)  # the FPN and head width (torchvision's 256)
    # The MGD authors' RetinaNet recipe starts the student from the teacher's neck and head.
    init_student_prefixes = ("backbone.fpn.", "head.")
    # The authors' λ and pixel mask; their α (2e-5) fits FPN levels of 1333×800, "auto" any size.
    mgd_defaults = {"alpha": "auto", "mask_ratio": 0.65, "mask": "pixel"}
    # From scratch on a few hundred images: AdamW lr 1e-3 with warm-up, batch 8 (SGD lr 0.02
    # learned nothing in 8 epochs), gradients clipped at max-norm 35 as in the authors' configs.
    recipe = {"optim": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
                        "grad_clip": 35.0},
              "batch_size": 8, "heal_lr": 5e-4}
    kd_defaults = {"temperature": 1.0, "weight": 1.0}
    int8_fp32_outputs = True  # box offsets and class logits in FP, as NNCF's detection examples

    def __init__(self, kind: str | None = None, image_size: int = 0):
        self.kind, self.image_size = kind, image_size
        if kind is not None:
            from pipeline.tasks.common.box_decode import OUTPUT_NAMES

            self.output_names = OUTPUT_NAMES[kind]

    def bind(self, cfg: "Config") -> "Detection":
        """This task for a run: decoding follows the teacher's family at ``[data] image_size``."""
        from pipeline.tasks.common.detectors import det_arch_kind

        try:
            kind = det_arch_kind(cfg.teacher.arch)
        except ConfigError:  # an unknown teacher: its preflight names the key and the choices
            return self
        if self.kind == kind and self.image_size == cfg.data.image_size:
            return self
        return Detection(kind, cfg.data.image_size)

    def _bound(self) -> None:
        if self.kind is None:
            raise RuntimeError("the detection task must be bound to a run's config (Detection.bind) before decoding")

    # -- data ------------------------------------------------------------------------------
    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        from pipeline.tasks.detection.data import check_data

        check_data(cfg, base_dir)

    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        from pipeline.tasks.detection.data import load_data

        return load_data(cfg, seed, base_dir)

    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """Letterboxed to ``S×S`` and normalised, as the COCO reader makes its images."""
        from pipeline.tasks.common.letterbox import LetterboxTransform

        return LetterboxTransform(cfg.image_size, cfg.mean, cfg.std)

    # -- models ----------------------------------------------------------------------------
    def check_arch(self, arch: str) -> None:
        from pipeline.tasks.common.detectors import check_det_arch

        check_det_arch(arch)

    def check_pair(self, teacher: str, student: str) -> None:
        """A ConfigError unless the teacher and the student are detectors of one family."""
        from pipeline.tasks.common.detectors import det_arch_kind

        if det_arch_kind(teacher) != det_arch_kind(student):
            raise ConfigError(
                f"distill.student = {student!r} is a {det_arch_kind(student)} detector but teacher.arch = {teacher!r} "
                f"is a {det_arch_kind(teacher)}: use one family (both RetinaNet, both FCOS or both SSDlite), so "
                "MGD pairs the same FPN levels and every build decodes its outputs the same way"
            )

    def build_model(self, arch: str, num_classes: int, *, image_size: int, weights: str = "",
                    base_dir: Path = Path("."), fpn_channels: int = 256) -> "nn.Module":
        from pipeline.tasks.common.detectors import build_det_model

        return build_det_model(arch, num_classes, image_size=image_size, weights=weights, base_dir=base_dir,
                               fpn_channels=fpn_channels)

    def default_layers(self, arch: str) -> list[str]:
        """Every FPN output level (P3-P7; SSDlite's six feature maps), one MGD loss each."""
        from pipeline.tasks.common.detectors import FPN_LEVELS, SSD_LEVELS, det_arch_kind

        try:
            levels = SSD_LEVELS if det_arch_kind(arch) == "ssd" else FPN_LEVELS
        except ConfigError:
            return ["fpn_taps.p3"]  # an unknown arch fails later, in preflight, with suggestions
        return [f"fpn_taps.{level}" for level in levels]

    def prune_keep(self, model: "nn.Module") -> list[str]:
        """The class and box output convs: their channels are anchors × classes / box coordinates."""
        return list(model.head_layers)

    # -- training --------------------------------------------------------------------------
    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        import torch

        return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                for t in targets]

    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        """torchvision's training loss of the family on the raw outputs, summed over its terms."""
        import torch

        self._bound()
        head = self.named_outputs(out)
        num_classes = head["cls_logits"].shape[-1] - (1 if self.kind == "ssd" else 0)
        from pipeline.tasks.common.detectors import stand_in

        model, detector = stand_in(self.kind, self.image_size, num_classes)
        anchors = torch.from_numpy(np.array(model.anchors)).to(head["cls_logits"].device)
        # torchvision's SSD counts the background as class 0; RetinaNet and FCOS label 0..C-1.
        shift = 1 if self.kind == "ssd" else 0
        tv_targets = [{"boxes": t["boxes"].float(), "labels": t["labels"] + shift} for t in targets]
        head = {k: v.float() for k, v in head.items()}
        per_image = [anchors] * len(tv_targets)
        if self.kind == "fcos":
            losses = detector.compute_loss(tv_targets, head, per_image, list(model.level_sizes))
        elif self.kind == "ssd":
            from torchvision.ops import boxes as box_ops

            matched = []
            for a, t in zip(per_image, tv_targets):
                if t["boxes"].numel() == 0:
                    matched.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
                else:
                    matched.append(detector.proposal_matcher(box_ops.box_iou(t["boxes"], a)))
            losses = detector.compute_loss(tv_targets, head, per_image, matched)
        else:
            losses = detector.compute_loss(tv_targets, head, per_image)
        return sum(losses.values())

    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """Logit KD on the class scores, anchor by anchor: binary cross-entropy to the teacher's
        sigmoid scores at temperature T (softmax KL for SSDlite), × T², averaged over anchors."""
        import torch.nn.functional as F

        t = cfg.temperature
        s = self.named_outputs(student_out)["cls_logits"].float() / t
        te = self.named_outputs(teacher_out)["cls_logits"].float() / t
        n, a = s.shape[:2]
        if self.kind == "ssd":
            kl = F.kl_div(F.log_softmax(s, -1), F.softmax(te, -1), reduction="sum")
            return kl * (t * t) / (n * a)
        return F.binary_cross_entropy_with_logits(s, te.sigmoid(), reduction="sum") * (t * t) / (n * a)

    def batch_size_of(self, targets: Any) -> int:
        return len(targets)

    # -- evaluation ------------------------------------------------------------------------
    def evaluator(self, num_classes: int) -> _MAP:
        self._bound()
        return _MAP(self, num_classes)

    def postprocess(self, outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detections per image (boxes xyxy in input pixels, scores, labels) by the shared decode + NMS."""
        from pipeline.tasks.common.box_decode import decode
        from pipeline.tasks.common.detectors import stand_in

        self._bound()
        num_classes = np.asarray(outputs["cls_logits"]).shape[-1] - (1 if self.kind == "ssd" else 0)
        model, _ = stand_in(self.kind, self.image_size, num_classes)
        return decode(outputs, model.anchors, arch_kind=self.kind, image_size=self.image_size,
                      level_sizes=model.level_sizes, **POSTPROCESS)

    def _agreement(self, reference: Any, candidate: Any) -> float:
        """Share of confident reference detections (score ≥ 0.3) found again by the candidate:
        same class, IoU ≥ 0.9, one to one; counted over the larger of the two confident sets,
        so extra candidate detections lower it too. 1.0 when neither has a confident detection."""
        from pipeline.tasks.common.coco_eval import box_matches

        matched, total = 0, 0
        for ref, cand in zip(reference, candidate, strict=True):
            r, c = ref["scores"] >= PARITY_SCORE, cand["scores"] >= PARITY_SCORE
            matched += box_matches(ref["boxes"][r], ref["labels"][r], cand["boxes"][c], cand["labels"][c], PARITY_IOU)
            total += max(int(r.sum()), int(c.sum()))
        return 1.0 if total == 0 else matched / total


TASK = Detection()
