"""Protocols, metrics, leakage: every attack's similarity matrix is scored the same way."""
