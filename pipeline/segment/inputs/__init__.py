"""INPUT: what a segment run covers, as sorted, unique image URIs.

kinds.py resolves INPUT once (:class:`~pipeline.segment.inputs.kinds.Input`); listing.py
streams its URIs in chunks; prefix.py fans a prefix's listing out; inventory.py reads an
S3 Inventory report; sort.py sorts and de-duplicates beyond memory; names.py says which
names are images.
"""
