"""The conditioning layer below the methods: conditions (class labels or encoded prompts) and text encoders."""
from .condition import (Condition, TextCondition, concat_conditions, condition_batch_size, condition_labels,
                        drop_conditions, select_conditions, unconditional)
from .text_encoders import EncodedText, MiniLMTextEncoder, TextEncoder, minilm_model_path
