"""Datasets: the built-in procedural shapes (`ShapesDataset`) and a user's folder
(`FolderDataset`); both yield (image (3, S, S) in [-1, 1], caption, ground truth or None)."""
from training.data.folder import DatasetError, FolderDataset, load_image
from training.data.shapes import (COLOURS, HELDOUT_COMBOS, KINDS, PALETTE, SIZES, Attrs,
                                  ShapeObject, ShapesDataset, caption_corpus, collate, render,
                                  sample_attrs, to_tensor, to_uint8)

__all__ = [
    "Attrs", "COLOURS", "DatasetError", "FolderDataset", "HELDOUT_COMBOS", "KINDS", "PALETTE",
    "SIZES", "ShapeObject", "ShapesDataset", "caption_corpus", "collate", "load_image", "render",
    "sample_attrs", "to_tensor", "to_uint8",
]
