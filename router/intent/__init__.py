"""Prompt intent classification: code, reasoning or general.

The model is read from the package on first use, not at import.
"""

from router.intent.classify import IntentResult, classify_request, classify_text, explain_request
from router.intent.model import LABELS, Intent

__all__ = ["LABELS", "Intent", "IntentResult", "classify_request", "classify_text", "explain_request"]
