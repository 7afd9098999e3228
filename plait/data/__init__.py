"""Data for plait: bundled synthetic sets, local captioning data, tokenizers and image preprocessing.

Kept import-free on purpose: `datasets`, `tokenizers` and Pillow are slow to import, so each
submodule is imported where it is used (`from plait.data.shapes import generate_shapes`).
"""
