"""The DDPM of stage 1 (paper §III-B, Fig. 3): UNet presets, its training, and the decoder features at t (Eq. 2)."""
