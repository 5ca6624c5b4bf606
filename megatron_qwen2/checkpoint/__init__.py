"""Native checkpoints and Hugging Face import / export (importing this does not need transformers)."""

from megatron_qwen2.checkpoint.hf import (expected_native_shapes, hf_config_to_model_config, hf_to_native,
                                          model_config_to_hf_config, native_to_hf)
from megatron_qwen2.checkpoint.native import (checkpoint_for, load_model, load_model_config, load_native_state,
                                              resolve_checkpoint_dir, save_native)

__all__ = ["save_native", "load_native_state", "load_model", "load_model_config", "resolve_checkpoint_dir",
           "hf_config_to_model_config", "model_config_to_hf_config", "hf_to_native", "native_to_hf",
           "expected_native_shapes", "checkpoint_for"]
