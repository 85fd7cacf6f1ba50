"""Training the embedded default model (arcstream-tiny): data mixture, loss mask, trainer, export and card."""
