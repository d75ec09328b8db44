"""Classification: one label per image (digits, an ImageFolder tree, a torchvision dataset),
torchvision/timm classifiers, top-1 accuracy."""

from pipeline.tasks.classification.task import TASK

__all__ = ["TASK"]
