"""Sample a bank of generated latents from a VAR or FAR model, for ``loss.gen_latents`` decoder tuning.

Usage: python scripts/sample_latents.py MODEL_DIR --data data/emoji128 --samples 2000 --out FILE.safetensors
    [--batch 25 --seed 1000 --threads 1]
MODEL_DIR is a freqar model folder (config.json + model.safetensors, e.g. src/freqar/assets/emoji-default
or src/freqar/assets/far-emoji).
Labels follow the training split's class proportions, as ``freqar eval`` draws them; use seeds the
evaluation does not (eval uses ``seed + batch index`` from 0), so the tuned decoder is scored on latents
it never saw. The file holds the latents as the decoder takes them, float32 (N, C, h, w): ``fhat`` for a
VAR model (the summed code map), ``z`` for a FAR model (the final latent divided by the autoencoder's
scale), and ``labels`` (N,) int64.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from freqar.eval.run import sample_labels
from freqar.io import save_safetensors
from freqar.models.far_pipeline import is_far_model, load_far_dir
from freqar.pipeline import load_pipeline_dir
from freqar.train.data import load_manifest_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True, help="a `freqar data` folder (class proportions)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    far = is_far_model(args.model_dir)
    pipe = load_far_dir(args.model_dir) if far else load_pipeline_dir(args.model_dir)
    train = load_manifest_dataset(Path(args.data), "train")
    labels = sample_labels(train.labels.numpy(), args.samples, pipe.num_classes, args.seed)
    lats = []
    for bi, i in enumerate(tqdm(range(0, len(labels), args.batch), desc="sampling latents", unit="batch")):
        out = pipe.generate(labels[i : i + args.batch], seed=args.seed + bi)
        lat = out.canvas.float().cpu()
        lats.append(lat / pipe.vae.cfg.scale_factor if far else lat)  # FAR: the decoder's own input
    key = "z" if far else "fhat"
    save_safetensors(args.out, {key: torch.cat(lats), "labels": torch.tensor(labels, dtype=torch.long)})
    print(f"wrote {args.out} ({len(labels)} latents)")


if __name__ == "__main__":
    main()
