"""The fusion teacher (paper §III-C): feature mapping (Fig. 5), frequency filter, dynamic cross-fusion (Fig. 6), the teacher model and stage."""
