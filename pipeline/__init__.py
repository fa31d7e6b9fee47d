"""Ray Data / Ray Train building blocks, by concern.

storage (fsspec, redaction, retries, atomic writes), formats/ (bytes <-> arrays),
segment/ (the segment job), output/ (reading a finished OUTPUT), train/ (the train job).
segment/ and train/ never import each other.
"""
