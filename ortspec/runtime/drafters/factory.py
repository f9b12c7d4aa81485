"""Builds one generation's proposer for a `DrafterKind`: the one place that maps kinds to drafters."""

from __future__ import annotations

from ortspec.runtime.drafters.hybrid import HybridLength, HybridProposer
from ortspec.runtime.drafters.model import DraftModelProposer, FeatureHeadProposer
from ortspec.runtime.drafters.ngram import NgramProposer
from ortspec.runtime.drafters.suffix import SuffixMemory, SuffixProposer
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.options import DrafterKind, GenerationConfig
from ortspec.runtime.speculation.draft_length import DraftLengthPolicy
from ortspec.runtime.speculation.proposal import Proposer


def new_proposer(
    kind: DrafterKind,
    config: GenerationConfig,
    target: DecoderState,
    draft: DecoderState | None,
    length: DraftLengthPolicy | None,
    suffix_memory: SuffixMemory,
    shared_vocab: int | None = None,
) -> Proposer | None:
    """The proposer of one generation, drafting with its own `draft` state (a head: with `target`'s features);
    None for plain decoding."""
    if kind is DrafterKind.NONE:
        return None
    if kind is DrafterKind.NGRAM:
        return NgramProposer(config.max_ngram_size)
    if kind is DrafterKind.SUFFIX:
        return SuffixProposer(suffix_memory)
    if draft is None:
        raise ValueError(f"the {kind} drafter needs the package's draft model")
    model: DraftModelProposer
    if draft.spec.is_head:
        model = FeatureHeadProposer(draft, target, shared_vocab, config.draft_min_prob)
    else:
        model = DraftModelProposer(draft, shared_vocab, config.draft_min_prob)
    if kind is DrafterKind.HYBRID:
        if not isinstance(length, HybridLength):
            raise TypeError("the hybrid drafter runs under a HybridLength policy")
        return HybridProposer(SuffixProposer(suffix_memory), model, length)
    return model
