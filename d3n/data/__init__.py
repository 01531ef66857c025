"""Datasets: import (VOC/YOLO/COCO) into a YOLO layout, checks, and the synthetic defect generator."""
