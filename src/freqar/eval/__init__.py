"""Sample-quality metrics (Fréchet distance, KID, an Inception-Score analogue, k-NN precision/recall)."""
