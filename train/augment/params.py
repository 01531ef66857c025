"""The augment methods and their settings: plain data, imported by the CLI without torch."""

from __future__ import annotations

from dataclasses import dataclass

GENERATIVE = ("sdedit", "inpaint", "blend")  # draw with the defect generator
# paste: real crops, the classical baseline; noise: a control that fills the box with colour noise
METHODS = (*GENERATIVE, "paste", "noise")


@dataclass(frozen=True)
class Params:
    strength: float = 0.6  # sdedit: how far the crop is noised (0..1 of T)
    guidance: float = 3.0  # classifier-free guidance weight
    steps: int = 50  # denoising steps (DDIM; RePaint before its jumps)
    transition: float = 0.25  # blend: transition band, as a share of the box's shorter side
