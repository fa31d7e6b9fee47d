"""Fixtures and data shared by test modules (no test module imports another) and by bench/."""
