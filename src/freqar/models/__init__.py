"""Model families. Each registers its presets in ``freqar.registry``."""
