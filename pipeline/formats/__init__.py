"""Bytes <-> arrays: image decoding, COCO RLE, COCO datasets and the shapes generator."""
