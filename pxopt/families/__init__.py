"""Model families: one module each (what it matches, its layer map, LRP patches, sites)."""
