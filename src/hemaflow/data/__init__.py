"""The data stage: demo generator, native-format readers, validation, class matrix, scale, folds, prepare."""
