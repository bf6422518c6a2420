"""Quiet, offline use of the Hugging Face libraries."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers in align's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
