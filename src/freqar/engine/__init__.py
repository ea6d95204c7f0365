"""The scale-wise generation engine shared by every model family."""
