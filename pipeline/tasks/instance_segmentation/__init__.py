"""Instance segmentation: a box, a class and a mask per object (digit scenes, COCO instances JSON
with polygons or RLE), a YOLACT mask branch on FCOS with its post-processing outside the graph,
COCO mask and box mAP."""

from pipeline.tasks.instance_segmentation.task import TASK

__all__ = ["TASK"]
