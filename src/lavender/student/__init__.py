"""The student side: capture a VLM's text→image attention as maps on the image grid."""

from __future__ import annotations

from lavender.student.adapters import get_adapter
from lavender.student.capture import AttentionCapture

__all__ = ["AttentionCapture", "get_adapter"]
