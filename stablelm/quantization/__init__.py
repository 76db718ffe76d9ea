"""Weight-only int8 and int4 quantization: formats, the quantized linear layer, and applying them.

`quantize(model, "int8" | "int4" | QuantizationConfig)` replaces a loaded model's linear layers;
`from_pretrained(..., quantization_config=...)` does it layer by layer while loading; a saved quantized
model loads back as it is. See docs/quantization.md.
"""

from .apply import quantize
from .config import QuantizationConfig
from .linear import QuantizedLinear

__all__ = ["QuantizationConfig", "QuantizedLinear", "quantize"]
