"""Thin command-line entrypoints: parse arguments, call pipeline/, print results."""
