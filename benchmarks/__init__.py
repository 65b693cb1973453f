"""Throughput, agreement and memory benchmark of bertpipe against HF pipelines and plain Ray Data."""
