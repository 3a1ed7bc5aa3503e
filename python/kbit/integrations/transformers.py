"""kbit as a transformers quantization method, on transformers' public extension points
(`register_quantization_config`, `register_quantizer`, HfQuantizer's load operations).

    from kbit.integrations.transformers import KbitConfig
    model = AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=KbitConfig(quant_type="nf4"))
    model.save_pretrained(folder)                      # quant_method "kbit" in config.json
    model = AutoModelForCausalLM.from_pretrained(folder)  # after importing this module

Importing this module registers the method "kbit" (it needs transformers; kbit itself does not).
From a float checkpoint the linears (all but `skip`, default lm_head) become kbit Linear4bit layers
and are quantized after loading; a checkpoint saved with quant_method "kbit" holds bitsandbytes'
keys and bytes and loads back into Linear4bit layers. Checkpoints bitsandbytes wrote
(quant_method "bitsandbytes") stay with transformers' bitsandbytes quantizer (transformers refuses
another config class for them): load those into kbit with kbit.nn.load_4bit_checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import functional as F
from .. import nn as knn

__all__ = ["KbitConfig", "KbitHfQuantizer"]

METHOD = "kbit"


def _dtype_name(dtype: Any) -> Optional[str]:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype)
    name = name.removeprefix("torch.")
    if getattr(torch, name, None) not in F._DTYPES:
        raise ValueError(f"compute_dtype must be None, float32, float16 or bfloat16, got {dtype!r}")
    return name


class KbitConfig(QuantizationConfigMixin):
    """Quantize a model's nn.Linear layers with kbit's Linear4bit (see kbit.nn.replace_linear_4bit)."""

    def __init__(self, quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                 compute_dtype: Any = None, skip: Any = ("lm_head",), **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.quant_type = F._check_quant_type(quant_type)
        if not isinstance(compress_statistics, bool):
            raise TypeError(f"compress_statistics must be True or False, got {compress_statistics!r}")
        self.compress_statistics = compress_statistics
        self.blocksize = F._check_blocksize_4bit(blocksize)
        self.compute_dtype = _dtype_name(compute_dtype)
        self.skip = [skip] if isinstance(skip, str) else list(skip)
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"KbitConfig got unknown settings {unknown}")

    @property
    def torch_compute_dtype(self) -> Optional[torch.dtype]:
        return None if self.compute_dtype is None else getattr(torch, self.compute_dtype)


class _KbitDeserialize(ConversionOps):
    """One layer's saved tensors (weight and its quant state items) into its Linear4bit."""

    def __init__(self, hf_quantizer: HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Any = None, full_layer_name: Optional[str] = None,
                **kwargs: Any) -> dict[str, Any]:
        if len(input_dict) == 1:  # a float weight (e.g. lm_head): as it is
            return input_dict
        items = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        weight = items.pop("weight")
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, knn.Linear4bit):
            raise knn.KbitLoadError(f"{full_layer_name}: the checkpoint holds it in 4 bits but the model's module is "
                                    f"a {type(module).__name__}")
        problem = module._prepare_load(weight, {k.removeprefix("weight."): v for k, v in items.items()},
                                       str(full_layer_name))
        if problem:
            raise knn.KbitLoadError(problem)
        module._is_hf_initialized = True
        return {"weight": torch.nn.Parameter(weight, requires_grad=False)}


class KbitHfQuantizer(HfQuantizer):
    """Swaps the linears for Linear4bit before loading; quantizes float weights after loading."""

    requires_calibration = False
    quantization_config: KbitConfig
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                   "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                                   "weight.quant_state.bitsandbytes__fp4"]}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("kbit's Linear4bit layers cannot be offloaded to disk")

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False  # float weights load as they are; _process_model_after_weight_loading quantizes

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        c = self.quantization_config
        knn.replace_linear_4bit(model, quant_type=c.quant_type, compress_statistics=c.compress_statistics,
                                blocksize=c.blocksize, compute_dtype=c.torch_compute_dtype, skip=c.skip)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in model.modules():
            if isinstance(module, knn.Linear4bit) and not module.is_quantized:
                module.quantize_()
        return model

    def get_load_operations(self) -> dict:
        return {"deserialize": _KbitDeserialize}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # importing twice (or reloading) registers once
    register_quantization_config(METHOD)(KbitConfig)
    register_quantizer(METHOD)(KbitHfQuantizer)
