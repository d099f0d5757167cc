"""Reference outputs of Pillow's Image.resize(BICUBIC) and convert("RGB") for
leverflow's Qwen2.5-VL image preprocessing tests (operators/src/qwen2_5_vl/image.rs).

Usage: python tools/make_pil_resize_refs.py tests/fixtures/pil_resize
Writes (all PNG, lossless):
  src_rgb.png              40x30 noisy RGB source
  src_rgba.png / src_pal.png / src_la.png   RGBA, palette (with transparency), grey+alpha sources
  conv_{rgba,pal,la}.png   PIL convert("RGB") of each
  resize_WxH.png           PIL src_rgb.resize((W, H), BICUBIC) for several sizes
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)
h, w = 30, 40
yy, xx = np.mgrid[0:h, 0:w]
base = np.stack([xx * 6, yy * 8, (xx + yy) * 3], axis=2)
rgb = np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
src = Image.fromarray(rgb, "RGB")
src.save(out / "src_rgb.png")
for size in [(7, 5), (13, 30), (40, 11), (101, 67), (56, 56), (3, 90)]:
    src.resize(size, Image.BICUBIC).save(out / f"resize_{size[0]}x{size[1]}.png")
alpha = rng.integers(0, 256, (h, w, 1)).astype(np.uint8)
rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
rgba.save(out / "src_rgba.png")
pal = src.convert("P", palette=Image.ADAPTIVE, colors=16)
pal.info["transparency"] = 3
pal.save(out / "src_pal.png", transparency=3)
la = Image.fromarray(np.concatenate([rgb[:, :, :1], alpha], axis=2), "LA")
la.save(out / "src_la.png")
for name in ["rgba", "pal", "la"]:
    Image.open(out / f"src_{name}.png").convert("RGB").save(out / f"conv_{name}.png")
