"""Building blocks shared by every plait model."""
