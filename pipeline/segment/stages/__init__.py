"""The stages of the segment pipeline, one module each, as Ray Data map_batches callables
over Arrow tables: read (shard ranges -> keys -> bytes), decode, model (the actor),
encode (paste + RLE), write (parts). rows.py holds what every stage's rows start with.
"""
