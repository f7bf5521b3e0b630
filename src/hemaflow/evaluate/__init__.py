"""Evaluation: the test split end to end, box and probability ensembles, the cross-domain table."""
