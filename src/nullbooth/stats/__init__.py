"""Statistics of what the cross-attention layers see: capture hooks, float64 second moments, null spaces, compression."""
