"""Training, evaluation and prediction on top of the model and data layers."""
