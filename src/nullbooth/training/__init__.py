"""Training: the DreamBooth loop (setup → loop → finish), checkpoints and the training report."""
