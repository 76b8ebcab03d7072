"""The conditioning layer below the methods: conditions (class labels, encoded prompts or degraded images) and text
encoders."""
from .condition import (Condition, ImageCondition, TextCondition, carries_own_null, concat_conditions,
                        condition_batch_size, condition_labels, drop_conditions, select_conditions, unconditional)
from .text_encoders import EncodedText, MiniLMTextEncoder, TextEncoder, minilm_model_path
