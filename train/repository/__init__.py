"""The feature repository (paper §III-B): build, the shard store, ResVAE / PCA compressors and the compressed repository."""
