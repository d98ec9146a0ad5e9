"""Training loops shared by the methods (replacements, gates, healing)."""
