"""The builder reads config.json as transformers does, and refuses what it cannot build exactly."""

from __future__ import annotations

import numpy as np
import pytest

from ortspec.export.builder import UnsupportedModelError, can_build
from ortspec.export.builder.config import decoder_config
from ortspec.export.builder.head import head_decoder_config
from ortspec.export.builder.rope import inverse_frequencies

BASE = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "intermediate_size": 128,
    "vocab_size": 512,
}
PHI3_LONGROPE = {
    **BASE,
    "model_type": "phi3",
    "hidden_size": 128,  # head_dim 32; partial rotary 0.75 -> 24 rotary dims, 12 factors
    "partial_rotary_factor": 0.75,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(12)],
        "long_factor": [1.0 + 2.0 * i for i in range(12)],
    },
}


@pytest.mark.parametrize(
    ("extra", "global_layers"),
    [({}, [5]), ({"sliding_window_pattern": 2}, [1, 3, 5]), ({"layer_types": ["full_attention"] * 6}, list(range(6)))],
)
def test_gemma3_layer_kinds(extra, global_layers):
    """Without layer_types, every `sliding_window_pattern`-th layer (default 6) is global."""
    cfg = decoder_config(
        {**BASE, "model_type": "gemma3_text", "query_pre_attn_scalar": 16, "sliding_window": 8, **extra}
    )
    assert [i for i, sliding in enumerate(cfg.sliding_layers) if not sliding] == global_layers
    assert cfg.local_rope_theta == 10000.0 and cfg.qk_norm and cfg.sandwich_norms and cfg.attn_softcap == 0.0


def test_phi3_longrope_matches_transformers():
    """Both factor tables and the attention factor, against transformers' own longrope initialisation."""
    import torch
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = decoder_config(PHI3_LONGROPE)
    assert can_build(PHI3_LONGROPE) and cfg.rotary == 24 and cfg.long_rope_after == 4096
    reference = Phi3Config(**{k: v for k, v in PHI3_LONGROPE.items() if k != "model_type"})
    init = ROPE_INIT_FUNCTIONS["longrope"]
    for long, seq_len in ((False, None), (True, 4097)):
        inv_freq, factor = init(reference, torch.device("cpu"), seq_len=seq_len)
        ours = inverse_frequencies(cfg.rotary, cfg.rope_theta, cfg.rope_scaling, long=long)
        np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)  # float32 pow: within an ulp
        assert cfg.rope_scaling["attention_factor"] == pytest.approx(factor, rel=1e-12)
    assert cfg.rope_scaling["attention_factor"] > 1.0
    assert head_decoder_config(cfg).long_rope_after is None  # a draft head rotates one way (full rotary, no switch)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**BASE, "model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({**PHI3_LONGROPE, "model_type": "llama", "partial_rotary_factor": 1.0}, "rope scaling 'longrope'"),
        ({**PHI3_LONGROPE, "rope_scaling": {**PHI3_LONGROPE["rope_scaling"], "long_factor": [1.0]}}, "long_factor"),
        ({**BASE, "model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_unbuildable_configs_are_refused(config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        decoder_config(config)
    assert not can_build(config)
