"""A native MiniCPM-Llama3-V-2.5 (``model_type: minicpmv``): its checkpoint loads and trains without
``trust_remote_code``. Importing this package registers it with transformers' Auto classes
(``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoImageProcessor``, ``AutoProcessor``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from lavender.student.minicpmv.configuration import MiniCPMVConfig
from lavender.student.minicpmv.modeling import MiniCPMVForConditionalGeneration
from lavender.student.minicpmv.processing import MiniCPMVImageProcessor, MiniCPMVProcessor

AutoConfig.register(MiniCPMVConfig.model_type, MiniCPMVConfig, exist_ok=True)
AutoModelForImageTextToText.register(MiniCPMVConfig, MiniCPMVForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MiniCPMVConfig, image_processor_classes={"pil": MiniCPMVImageProcessor}, exist_ok=True)
AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)

__all__ = ["MiniCPMVConfig", "MiniCPMVForConditionalGeneration", "MiniCPMVImageProcessor", "MiniCPMVProcessor"]
