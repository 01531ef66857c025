"""The detector engine: YOLOv5s, the dataset whose augmentations features can follow, the one training loop, evaluation, the baseline."""
