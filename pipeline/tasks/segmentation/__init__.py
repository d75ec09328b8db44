"""Semantic segmentation: a class per pixel (digit scenes, image + mask-PNG folders), DeepLabV3 /
FCN / LRASPP / U-Net-style models, mIoU."""

from pipeline.tasks.segmentation.task import TASK

__all__ = ["TASK"]
