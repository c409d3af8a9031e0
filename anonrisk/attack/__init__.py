"""Re-identification attacks: the contrastive encoder, its loss and its training engines."""
