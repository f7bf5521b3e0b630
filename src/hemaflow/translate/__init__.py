"""Stain translation: CycleGAN, Reinhard and Macenko, applied to the labelled source cells."""
