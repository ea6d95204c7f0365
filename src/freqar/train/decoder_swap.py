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
    this run's outside the decoder side) and has this run's architecture, or the same one with more blocks
    (a deeper model grown from a trained one: the new blocks start as the identity); a fresh schedule starts.
    """
    if encoder_side_mismatch(own_latent, export_latent) is not None:
        raise CheckpointMismatch(
            f"{key} '{folder}' was trained on another latent space than this run's tokenizer / autoencoder"
        )
    want, got = model.state_dict(), export_model.state_dict()
    if want.keys() == got.keys() and all(want[k].shape == got[k].shape for k in want):
        model.load_state_dict(got)
        return
    if grow_from(model, export_model) is None:
        raise CheckpointMismatch(
            f"{key} '{folder}' is a different transformer than model.* describes; "
            "copy its depth/width/heads into the config (only more blocks of the same width can be added)"
        )


def new_blocks(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str] | None:
    """The modules ``want`` has beyond ``got`` (e.g. ``encoder_blocks.4``, ``decoder.up.0.block.2``) when
    whole new members of numbered block lists are the only difference (every tensor of ``got`` present with
    its shape), else None. A new module is the shortest prefix of a missing key that holds no loaded tensor.
    """
    if any(k not in want or want[k].shape != v.shape for k, v in got.items()):
        return None
    loaded_prefixes = {".".join(k.split(".")[:i]) for k in got for i in range(1, k.count(".") + 1)}
    roots = set()
    for k in want.keys() - got.keys():
        parts = k.split(".")
        root = next(
            (".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in loaded_prefixes),
            None,
        )
        if root is None or not root.rsplit(".", 1)[-1].isdigit():
            return None  # a new tensor in an existing module, or a new module outside a block list
        roots.add(root)
    return sorted(roots)


# The layer that ends each residual branch, per block type: pre-norm ViT (FAR), VAR's AdaLN block, the
# diffusion MLP's residual block (its adaLN gate), and the convolutional res / attention blocks.
BRANCH_ENDS = ("attn.proj", "mlp.fc2", "ffn.fc2", "adaLN_modulation.1", "conv2", "proj_out")


def make_identity(model: nn.Module, prefixes: list[str]) -> None:
    """Zero the layers that end each residual branch of the new blocks, so every new block passes its input
    through unchanged: the grown model computes exactly what the export did, and training only adds to it.
    A block whose residual path is not the identity (a width change) cannot start this way and is refused.
    """
    with torch.no_grad():
        for prefix in prefixes:
            block = model.get_submodule(prefix)
            found = [
                m
                for n, m in block.named_modules()
                if n in BRANCH_ENDS and isinstance(m, (nn.Linear, nn.Conv2d))
            ]
            shortcut = getattr(block, "nin_shortcut", None)
            if not found or (shortcut is not None and not isinstance(shortcut, nn.Identity)):
                raise CheckpointMismatch(f"cannot start the new block '{prefix}' as the identity")
            for m in found:
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


def grow_from(model: nn.Module, start: nn.Module) -> list[str] | None:
    """Load ``start`` into ``model`` when ``model`` only adds blocks (new ones start as the identity); returns
    the new blocks, or None (nothing loaded) when the two differ otherwise."""
    want, got = model.state_dict(), start.state_dict()
    grown = new_blocks(want, got)
    if grown is None:
        return None
    model.load_state_dict(got, strict=False)
    make_identity(model, grown)
    return grown


def grow_decoder(vae: nn.Module, start: nn.Module) -> None:
    """Start ``vae`` from ``start`` when only their decoders differ in shape (a decoder-only run).

    A deeper decoder of the same width (more res blocks per level) keeps every trained block and starts each
    new one as the identity (``grow_from``), so it begins exactly where ``start`` ends. A decoder
    of another width (or a shallower one) cannot reuse the trained one: everything outside the decoder
    proper loads and the decoder starts from its fresh initialisation.
    """
    if grow_from(vae, start) is not None:
        return
    state = {k: v for k, v in start.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith("decoder.") for k in missing):
        raise CheckpointMismatch("init.path differs from model.* outside the decoder")
