"""`d3n augment`: new defect images for the train split, from the project's own diffusion model
(sdedit, inpaint, blend) or by classical Poisson cloning (paste); `noise` is their control."""
