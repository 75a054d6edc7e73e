"""Figures, overlays and animations."""
