"""Stage 3 of D3N: distil the fusion teacher into a plain YOLOv5s student (paper §III-D)."""
