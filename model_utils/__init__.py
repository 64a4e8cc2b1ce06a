"""Configuration and device set-up shared by train.py, eval.py and export.py."""
