"""Swap in the decoder of a decoder-only fine-tune (``init.decoder_only``) without touching the latent space.

A decoder fine-tune keeps the encoder, quantiser/posterior and codebook bit-identical, so a generator trained
on the original latents (VAR codes, FAR latents) stays valid with the sharper decoder. The swap checks that
promise before loading, so a tokenizer from another run cannot slip in.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import CheckpointMismatch

DECODER_SIDE = ("decoder.", "post_quant_conv.")


def encoder_side_mismatch(a: nn.Module, b: nn.Module) -> str | None:
    """Why ``a`` and ``b`` do not share a latent space (another layout, or the first differing weight
    outside the decoder side), or None when they do: the same codes / latents for the same image."""

    def encoder_side(m: nn.Module) -> dict[str, torch.Tensor]:  # the decoder may differ in shape
        return {k: v for k, v in m.state_dict().items() if not k.startswith(DECODER_SIDE)}

    mine, theirs = encoder_side(a), encoder_side(b)
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return "a different architecture"
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    return f"encoder side differs ({differ[0]}, ...)" if differ else None


def swap_decoder(own: nn.Module, tuned: nn.Module, source: str) -> None:
    """Load ``tuned``'s decoder side into ``own`` after checking everything outside it is equal; a decoder
    of another shape replaces ``own``'s decoder modules (and its config)."""
    why = encoder_side_mismatch(own, tuned)
    if why is not None:
        raise CheckpointMismatch(
            f"{source}: {why} from the model's autoencoder: not a decoder-only fine-tune of it"
        )
    want, got = own.state_dict(), tuned.state_dict()
    if want.keys() == got.keys() and all(want[k].shape == got[k].shape for k in want):
        own.load_state_dict(got)
        return
    # a decoder of another shape (wider / deeper, trained on the frozen encoder): take its modules and the
    # config that describes them, so a saved model rebuilds the same decoder
    for name, child in tuned.named_children():
        if name + "." in DECODER_SIDE:
            setattr(own, name, copy.deepcopy(child))
    if hasattr(tuned, "cfg"):
        own.cfg = tuned.cfg


def start_from_export(
    model: nn.Module,
    own_latent: nn.Module,
    export_latent: nn.Module,
    export_model: nn.Module,
    key: str,
    folder: str,
) -> None:
    """Load an exported generator into ``model`` for a second training phase (``var.init`` / ``far.init``).

    Refused unless the export was trained on the same latent space (its tokenizer / autoencoder agrees with
    this run's outside the decoder side) and has exactly this run's architecture; a fresh schedule starts.
    """
    if encoder_side_mismatch(own_latent, export_latent) is not None:
        raise CheckpointMismatch(
            f"{key} '{folder}' was trained on another latent space than this run's tokenizer / autoencoder"
        )
    want, got = model.state_dict(), export_model.state_dict()
    if want.keys() != got.keys() or any(want[k].shape != got[k].shape for k in want):
        raise CheckpointMismatch(
            f"{key} '{folder}' is a different transformer than model.* describes; "
            "copy its depth/width/heads into the config"
        )
    model.load_state_dict(got)
