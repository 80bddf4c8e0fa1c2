"""Thin Prefect task wrappers around :mod:`lung_models`: paths in, paths and small dicts out."""
