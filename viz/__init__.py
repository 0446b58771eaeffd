"""Rendering the turn DAG for review (DOT, SVG, PNG, HTML)."""
