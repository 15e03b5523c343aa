"""Model families: one module each (what it matches, its layer map, its LRP canonisation)."""
