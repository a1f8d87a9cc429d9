"""Helpers shared by the tests: end-to-end runs against HF eager, float64 references, the family table."""
