"""Ray Data / Ray Train building blocks: storage, decoding, RLE, Parquet, COCO."""
