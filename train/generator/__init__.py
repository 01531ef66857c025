"""The defect generator: a class-conditional DDPM trained on defect crops, sampled with
classifier-free guidance (used by `d3n augment`)."""
