"""Swap in the decoder of a decoder-only fine-tune (``init.decoder_only``) without touching the latent space.

A decoder fine-tune keeps the encoder, quantiser/posterior and codebook bit-identical, so a generator trained
on the original latents (VAR codes, FAR latents) stays valid with the sharper decoder. The swap checks that
promise before loading, so a tokenizer from another run cannot slip in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointMismatch

DECODER_SIDE = ("decoder.", "post_quant_conv.")


def swap_decoder(own: nn.Module, tuned: nn.Module, source: str) -> None:
    """Load ``tuned``'s weights into ``own`` after checking everything outside the decoder side is equal."""
    mine, theirs = own.state_dict(), tuned.state_dict()
    if mine.keys() != theirs.keys():
        raise CheckpointMismatch(f"{source}: a different architecture than the model's autoencoder")
    differ = [k for k in mine if not k.startswith(DECODER_SIDE) and not torch.equal(mine[k], theirs[k])]
    if differ:
        raise CheckpointMismatch(
            f"{source}: encoder side differs from the model's autoencoder ({differ[0]}, ...): "
            "not a decoder-only fine-tune of it"
        )
    own.load_state_dict(theirs)
