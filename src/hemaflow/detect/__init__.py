"""The detection stage: an MMDetection white-cell detector built from params, tiled inference, box metrics."""
