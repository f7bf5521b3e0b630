"""The classification stage: timm classifiers on cell crops, k-fold, TTA, ensembles."""
