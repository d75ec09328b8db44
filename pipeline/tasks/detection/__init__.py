"""Object detection: boxes (digit scenes, COCO instances JSON), FCOS / RetinaNet / SSDlite with their
post-processing outside the graph, COCO mAP."""

from pipeline.tasks.detection.task import TASK

__all__ = ["TASK"]
