"""Instance segmentation on the embedded digit scenes (:mod:`pipeline.tasks.common.scenes`):
a box, a class and a mask per digit, no download.

Items have the form of the COCO reader's with masks (:class:`pipeline.tasks.common.coco.CocoDetectionDataset`),
so one model, loss and evaluator serve both sources. A digit's mask is its visible stroke
pixels (where strokes overlap, the digit drawn last owns them, as in the segmentation masks);
a digit whose strokes are all covered is left out. A scene is already square at the model's
size: its letterbox is the identity (``scale`` 1, ``pad`` ``(0, 0)``, ``orig_size`` ``(S, S)``).
No flip augmentation: a mirrored digit is another symbol (or none).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.tasks.common.scenes import Scenes

SCENE_CLASSES = [str(d) for d in range(10)]  # contiguous label d is digit d


class SceneInstanceDataset(Dataset):
    """Items ``(float32 3×S×S normalised image, target)`` from scenes rendered with instance masks.

    ``target``: ``boxes`` float32 K×4 ``x1, y1, x2, y2``, ``labels`` int64 K, ``masks`` uint8
    K×S×S, ``rles`` (the masks as COCO compressed RLEs, for evaluation), empty crowd fields,
    ``image_id`` (the index), ``orig_size`` ``(S, S)``, ``scale`` 1.0, ``pad`` ``(0, 0)``.
    """

    def __init__(self, scenes: Scenes, mean: tuple[float, float, float], std: tuple[float, float, float]):
        from pipeline.tasks.common.coco_masks import encode

        if scenes.instance_masks is None:
            raise ValueError("SceneInstanceDataset needs scenes made with instances=True")
        self.images = scenes.images
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.class_names = list(SCENE_CLASSES)
        self.objects: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]]] = []
        for boxes, labels, masks in zip(scenes.boxes, scenes.labels, scenes.instance_masks):
            seen = masks.flatten(1).any(dim=1)  # a digit wholly covered by later ones has no mask
            masks = masks[seen].to(torch.uint8)
            self.objects.append((boxes[seen].to(torch.float32), labels[seen].to(torch.int64), masks,
                                 [encode(m.numpy()) for m in masks]))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} scenes")
        x = self.images[i]  # (1, S, S)
        s = int(x.shape[-1])
        boxes, labels, masks, rles = self.objects[i]
        target = {
            "boxes": boxes.clone(),
            "labels": labels.clone(),
            "masks": masks,
            "rles": list(rles),
            "crowd_boxes": torch.zeros((0, 4), dtype=torch.float32),
            "crowd_labels": torch.zeros((0,), dtype=torch.int64),
            "crowd_rles": [],
            "image_id": i,
            "orig_size": (s, s),
            "scale": 1.0,
            "pad": (0, 0),
        }
        return (x.expand(3, -1, -1) - self.mean) / self.std, target
