"""The shapes world: captioned scenes of shapes, its judge and feature extractors."""
