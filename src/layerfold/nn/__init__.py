"""Modules that stand in for removed layers: LLM-Streamline's replacements."""
