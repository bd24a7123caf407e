"""Datasets, mask generators and run-length codecs."""
