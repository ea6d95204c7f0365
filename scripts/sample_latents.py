"""Sample a bank of generated latents (f_hat) from a VAR model, for ``loss.gen_latents`` decoder tuning.

Usage: python scripts/sample_latents.py MODEL_DIR --data data/emoji128 --samples 2000 --out FILE.safetensors
    [--batch 25 --seed 1000 --threads 1]
MODEL_DIR is a freqar model folder (config.json + model.safetensors, e.g. src/freqar/assets/emoji-default).
Labels follow the training split's class proportions, as ``freqar eval`` draws them; use seeds the
evaluation does not (eval uses ``seed + batch index`` from 0), so the tuned decoder is scored on latents
it never saw. The file holds ``fhat`` (N, C, h, w) float32 and ``labels`` (N,) int64.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from freqar.eval.run import sample_labels
from freqar.io import save_safetensors
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
    pipe = load_pipeline_dir(args.model_dir)
    train = load_manifest_dataset(Path(args.data), "train")
    labels = sample_labels(train.labels.numpy(), args.samples, pipe.num_classes, args.seed)
    fhats = []
    for bi, i in enumerate(tqdm(range(0, len(labels), args.batch), desc="sampling latents", unit="batch")):
        out = pipe.generate(labels[i : i + args.batch], seed=args.seed + bi)
        fhats.append(out.canvas.float().cpu())
    save_safetensors(args.out, {"fhat": torch.cat(fhats), "labels": torch.tensor(labels, dtype=torch.long)})
    print(f"wrote {args.out} ({len(labels)} latents)")


if __name__ == "__main__":
    main()
