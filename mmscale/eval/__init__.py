"""Evaluation: image-text retrieval and zero-shot classification, single process or across ranks."""
