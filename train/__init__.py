"""Stages 1-2 of D3N (server side): DDPM, feature repository, ResVAE/PCA, fusion teacher, baseline."""
