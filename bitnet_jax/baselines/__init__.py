"""Baselines that are not a training variant: the post-training rotation baselines (QuaRot, SpinQuant)."""
