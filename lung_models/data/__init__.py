"""Data: the catalog of data sets, readers for the file formats (DICOM included), generated phantoms,
data-set sources, and the splits and cached arrays training reads."""
