"""Datasets: ILSVRC-2012 layouts, Parquet shards, CPU and on-device transforms, sample data."""
