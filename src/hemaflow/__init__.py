"""hemaflow: reproducible white-blood-cell detection, stain translation and classification."""

__version__ = "0.1.0"
