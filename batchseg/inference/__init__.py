"""Detection models and running them: the model registry, weights, the predictor, the mask paste.
Torch, no Ray."""
