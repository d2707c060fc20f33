"""Datasets: loading and validation, chat templates, tokenization, batching, held-out splits."""
