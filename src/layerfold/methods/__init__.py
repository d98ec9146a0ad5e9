"""Compression methods. Each module reads like its paper's algorithm."""
