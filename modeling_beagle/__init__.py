"""Beagle: a cross-attention draft model for lossless speculative decoding with HuggingFace transformers.

Importing this package registers Beagle with the Auto classes, so `AutoModel.from_pretrained(beagle_dir)` works
without remote code. The same folder ships next to every checkpoint as its remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_beagle import BeagleCache
from .configuration_beagle import BeagleConfig, BeagleConfigError, BeagleTargetWarning
from .decoding_beagle import (
    TreeShape,
    auto_tree_shape,
    beagle_generate,
    draft_sampled_tree,
    draft_tree,
    generate_with_own_loop,
    measure_verification_cost,
    recursive_rejection_sample,
    tree_shape_for_costs,
    verification_cost_samples,
)
from .generation_beagle import BeagleCandidateGenerator, BeagleGenerationError, BeagleGenerationStats
from .masking_beagle import (
    context_causal_mask,
    inverse_block_mask,
    key_padding_mask,
    to_attention_mask,
    tree_ancestor_mask,
    window_draft_mask,
    window_starts,
)
from .modeling_beagle import BeagleCheckpointError, BeagleModel, BeagleOutput, BeaglePreTrainedModel
from .prepack_beagle import (
    PrepackedLinear,
    is_prepacked,
    packed_path,
    prepack_linear_weights,
    prepacking_available,
    unpack_linear_weights,
)

__version__ = "0.1.0"

AutoConfig.register("beagle", BeagleConfig, exist_ok=True)
AutoModel.register(BeagleConfig, BeagleModel, exist_ok=True)
AutoModelForCausalLM.register(BeagleConfig, BeagleModel, exist_ok=True)

__all__ = [
    "TreeShape",
    "auto_tree_shape",
    "beagle_generate",
    "draft_sampled_tree",
    "draft_tree",
    "generate_with_own_loop",
    "recursive_rejection_sample",
    "measure_verification_cost",
    "verification_cost_samples",
    "tree_shape_for_costs",
    "PrepackedLinear",
    "is_prepacked",
    "packed_path",
    "prepack_linear_weights",
    "prepacking_available",
    "unpack_linear_weights",
    "BeagleCandidateGenerator",
    "BeagleGenerationError",
    "BeagleGenerationStats",
    "BeagleCache",
    "BeagleCheckpointError",
    "BeagleConfig",
    "BeagleConfigError",
    "BeagleTargetWarning",
    "BeagleModel",
    "BeagleOutput",
    "BeaglePreTrainedModel",
    "context_causal_mask",
    "inverse_block_mask",
    "key_padding_mask",
    "to_attention_mask",
    "tree_ancestor_mask",
    "window_draft_mask",
    "window_starts",
]
