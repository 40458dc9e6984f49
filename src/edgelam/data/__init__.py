"""Data: sources (real files, HF Hub), synthetic tasks, partitioners, chat formatting."""
