"""Prefect flows: train the registered models, score incoming files, and the offline demo."""
