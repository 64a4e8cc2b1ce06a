"""DELF (DEep Local Features) on MindSpore: extraction, matching, retrieval and training."""
