"""Data: readers for the file formats, generated phantoms, and data-set sources."""
