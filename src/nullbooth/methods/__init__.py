"""Training strategies (what is trained and how it is saved): NullBooth, baselines, adapters, Perfusion."""
