"""Writes the OpenFlamingo fixture's weights as the real artifacts ship them: pickled PyTorch files.

    python tools/make_flamingo_pickles.py [--fixture tests/fixtures/openflamingo_tiny]

Reads the fixture's safetensors files and writes, under <fixture>/pickled/:
  checkpoint.pt                 OpenFlamingo's checkpoint (perceiver, gated cross-attention, resized wte), a plain
                                state dict as open_flamingo's trainer saves it (`torch.save(state_dict)`)
  pytorch_model.bin             the MosaicGPT language model (`transformer.*`), as `save_pretrained` without safetensors
  open_clip_pytorch_model.bin   the open_clip weights (`visual.*`), as open_clip's hub repositories ship them
Tensors keep their stored dtype (bf16). Needs torch and safetensors.
"""
import argparse
import os

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="tests/fixtures/openflamingo_tiny")
    args = ap.parse_args()
    out = os.path.join(args.fixture, "pickled")
    os.makedirs(out, exist_ok=True)
    pairs = [
        ("flamingo_checkpoint.safetensors", "checkpoint.pt"),
        ("lm/model.safetensors", "pytorch_model.bin"),
        ("vision.safetensors", "open_clip_pytorch_model.bin"),
    ]
    for src, dst in pairs:
        sd = load_file(os.path.join(args.fixture, src))
        torch.save({k: v.contiguous() for k, v in sorted(sd.items())}, os.path.join(out, dst))
        print(f"{dst}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
