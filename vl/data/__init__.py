"""Data layer: annotations -> targets, feature shards on S3, synthetic data, streaming dataset.

Modules (import them directly; this package imports nothing so `vl.data.batch` stays cheap):
annotations (JSONL records, validation, spec 1.4 targets), features (official npz layout),
shards (Parquet shard format + manifest), dataset (ShardDataset, collate, make_loader),
synthetic (planted-signal data in the official layout), batch (the Batch contract).
"""
