"""Golden fixtures for a TINY random OpenFlamingo (flamingo_3B architecture: open_clip ViT + perceiver +
gated cross-attention every layer + MosaicGPT/MPT-1b style LM with ALiBi, QK-LayerNorm, no biases).

Nothing here is third-party code: the MosaicGPT reference implementation is *assembled at run time* from a
local clone of the public mosaicml/examples repository (tag v0.0.4, the version the MPT-1b-RedPajama-200b
model card points to) into a scratch model directory, and open_flamingo / open_clip are the PyPI packages.
See README.md next to this file.

Usage (environment described in README.md):
  python make_flamingo.py --examples-git <mosaicml/examples .git dir> --scratch SCRATCH_DIR \
      --out <output dir> [--seed 0]

Outputs in --out (all small, < 5 MB):
  lm/                    tiny MosaicGPT: config.json (real-1B flags, tiny sizes), model.safetensors
                         (keys as in the real mpt-1b state dict: transformer.*), tokenizer files.
                         No python code: the generator copies the assembled remote code in only while it runs.
  vision.safetensors     open_clip CLIP state dict of the tiny vision tower (keys visual.*, as in open_clip)
  vision_config.json     the open_clip model config registered as "tiny-vit"
  flamingo_checkpoint.safetensors  what OpenFlamingo's checkpoint.pt holds: perceiver.*,
                         lang_encoder.transformer.blocks.N.gated_cross_attn_layer.*, lang_encoder.transformer.wte.weight
  All weights are stored as bf16 and are exactly bf16-representable; the reference ran in fp32.
  images/*.png           query/ICD images
  cases.json             prompts, input_ids, shapes, logits excerpts, generations (greedy and beam=3)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys

EXAMPLES_TAG = "v0.0.4"
SRC = "examples/llm/src/models/"
# file in the examples repo -> flat file name in the HF remote-code dir
MPT_FILES = {
    "mosaic_gpt/configuration_mosaic_gpt.py": "configuration_mosaic_gpt.py",
    "mosaic_gpt/mosaic_gpt.py": "mosaic_gpt.py",
    "layers/attention.py": "attention.py",
    "layers/gpt_blocks.py": "gpt_blocks.py",
    "utils/param_init_fns.py": "param_init_fns.py",
}
# replacement for absolute / composer imports (glue only)
IMPORT_MAP = {
    "composer.algorithms.low_precision_layernorm.low_precision_layernorm":
        "from .low_precision_layernorm import LPLayerNorm",
    "examples.llm.src.models.layers.attention": {
        "mosaic_gpt.py": "from . import attention\nfrom .attention import MultiheadAttention  # noqa: F401 (HF copies relative files)",
        "gpt_blocks.py": "from .attention import MultiheadAttention",
    },
    "examples.llm.src.models.layers.gpt_blocks":
        "from . import gpt_blocks\nfrom .gpt_blocks import GPTBlock  # noqa: F401",
    "examples.llm.src.models.mosaic_gpt.configuration_mosaic_gpt":
        "from .configuration_mosaic_gpt import MosaicGPTConfig",
    "examples.llm.src.models.utils": "from .param_init_fns import MODEL_INIT_REGISTRY",
    "composer.metrics": "", "composer.metrics.nlp": "", "composer.models": "", "omegaconf": "",
}
# composer's LPLayerNorm: plain LayerNorm computed in the autocast dtype (identical to LayerNorm in fp32).
LPLN_SHIM = '''import torch
import torch.nn.functional as F


def _cast(t):
    if t is None or not torch.is_autocast_enabled():
        return t
    return t.to(torch.get_autocast_gpu_dtype() if t.device.type == "cuda" else torch.get_autocast_cpu_dtype())


class LPLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        with torch.autocast(enabled=False, device_type=x.device.type):
            return F.layer_norm(_cast(x), self.normalized_shape, _cast(self.weight), _cast(self.bias), self.eps)
'''


def assemble_mpt_code(examples_git: str, dest: str) -> None:
    """Write the MosaicGPT remote-code files (flat, relative imports, Composer parts removed) into dest."""
    os.makedirs(dest, exist_ok=True)
    for src, name in MPT_FILES.items():
        text = subprocess.check_output(
            ["git", "--git-dir", examples_git, "show", f"{EXAMPLES_TAG}:{SRC}{src}"], text=True)
        if name == "mosaic_gpt.py":  # drop the Composer training wrapper
            text = text[: text.index("class ComposerMosaicGPT")]
            # open_flamingo's Flamingo.forward passes labels=None; the anas-awadalla copy of the model accepts
            # `labels` (training loss). Inference never uses it, so accept and require None.
            sig = "            use_cache: Optional[bool] = None):\n"
            assert text.count(sig) == 1
            text = text.replace(sig, "            use_cache: Optional[bool] = None,\n            labels=None):\n"
                                "        assert labels is None, 'labels not supported by this fixture glue'\n"
                                # tokenizer masks are int64; the hub copy must accept them (Lever-Plus
                                # passes them straight through), v0.0.4 only casts in prepare_inputs_for_generation
                                "        if attention_mask is not None:\n"
                                "            attention_mask = attention_mask.bool()\n")
        lines = text.split("\n")
        tree = ast.parse(text)
        edits = []
        for node in tree.body:
            mod = None
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            if mod in IMPORT_MAP:
                rep = IMPORT_MAP[mod]
                if isinstance(rep, dict):
                    rep = rep[name]
                edits.append((node.lineno - 1, node.end_lineno, rep))
        for start, end, rep in sorted(edits, reverse=True):
            lines[start:end] = rep.split("\n") if rep else []
        with open(os.path.join(dest, name), "w") as f:
            f.write("\n".join(lines))
    with open(os.path.join(dest, "low_precision_layernorm.py"), "w") as f:
        f.write(LPLN_SHIM)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples-git", required=True, help="git dir of a mosaicml/examples clone")
    ap.add_argument("--scratch", required=True, help="scratch dir (assembled model dirs live here)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--residual_scale", type=float, default=30.0, help="multiplies the LM blocks' out_proj and mlp_down weights")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_MODULES_CACHE"] = os.path.join(args.scratch, "hf_modules")

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file, load_file

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    scratch = os.path.abspath(args.scratch)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "images"))
    # the path must contain "mpt-1b-redpajama-200b": open_flamingo's factory keys its
    # get_input_embeddings hack on that substring
    lm_dir = os.path.join(scratch, "mpt-1b-redpajama-200b")
    if os.path.exists(lm_dir):
        shutil.rmtree(lm_dir)
    assemble_mpt_code(os.path.abspath(args.examples_git), lm_dir)

    # ---------------- tokenizer (GPT-NeoX-20B is not obtainable offline: tiny byte-level BPE) ----------
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    corpus = [
        "Question:What color is the ball? Short answer:red",
        "Question:What is the man holding? Short answer:umbrella",
        "Question:How many dogs are there? Short answer:2",
        "Question:Is it raining? Short answer:yes",
        "Question:What shape is the sign? Short answer:circle",
        "Question:Where is the cat sitting? Short answer:on the sofa",
        "a photo of a dog, blue sky, green grass, yellow car, no, one, two, three",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(lm_dir, "tokenizer.json"))
    with open(os.path.join(lm_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
                   "model_max_length": 2048, "clean_up_tokenization_spaces": True}, f, indent=1)
    with open(os.path.join(lm_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}, f, indent=1)
    base_vocab = tok.get_vocab_size()

    # ---------------- tiny MosaicGPT with the real 1B flags ----------------
    sys.path.insert(0, scratch)
    lm_cfg = {
        "architectures": ["MosaicGPT"],
        "auto_map": {"AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                     "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
        "model_type": "mosaic_gpt",
        "d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 256,
        "vocab_size": 448,  # padded above len(tokenizer) like the real 50432 > 50280; resized at load
        "attn_impl": "torch", "attn_qk_ln": True, "attn_clip_qkv": None, "softmax_scale": None,
        "alibi": True, "alibi_bias_max": 8, "no_bias": True, "low_precision_layernorm": True,
        "logit_scale": None, "prefix_lm": False, "attn_uses_sequence_id": False,
        "attn_pdrop": 0.0, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "embedding_fraction": 1.0,
        "init_device": "cpu", "param_init_fn": "kaiming_normal_", "init_std": 0.02,
        "init_nonlinearity": "relu", "fan_mode": "fan_in", "init_gain": 0, "init_div_is_residual": True,
        "emb_init_std": None, "emb_init_uniform_lim": None, "use_cache": False, "verbose": 0,
        "tokenizer_name": "tiny-bpe (stand-in for EleutherAI/gpt-neox-20b)",
    }
    from transformers import AutoConfig, AutoModelForCausalLM
    with open(os.path.join(lm_dir, "config.json"), "w") as f:
        json.dump(lm_cfg, f, indent=1)
    config = AutoConfig.from_pretrained(lm_dir, trust_remote_code=True, local_files_only=True)
    lm = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():  # LayerNorm weights != 1 so that a missing/extra norm shows in the numbers
        for n, p in lm.named_parameters():
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or "_ln." in n or "ln_f" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if "wte" in n:
                p.copy_(0.5 * torch.randn_like(p))
        for p in lm.parameters():  # every weight exactly representable in bf16 (files are stored as bf16)
            p.copy_(p.bfloat16().float())
        for n, p in lm.named_parameters():
            # larger residual writes than the tiny init gives, so the next token is not just the last one;
            # applied before saving, so that lm/model.safetensors holds the weights the reference runs
            if n.endswith(("attn.out_proj.weight", "mlp.mlp_down.weight")):
                p.copy_((p * args.residual_scale).bfloat16().float())
    lm.save_pretrained(lm_dir, safe_serialization=True)
    bf16 = lambda sd: {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}
    save_file(bf16(load_file(os.path.join(lm_dir, "model.safetensors"))), os.path.join(lm_dir, "model.safetensors"),
              metadata={"format": "pt"})
    lm_state_keys = sorted(load_file(os.path.join(lm_dir, "model.safetensors")).keys())

    # ---------------- tiny open_clip vision tower ----------------
    import open_clip
    vis_cfg = {"embed_dim": 32, "quick_gelu": True,  # openai ViT-L-14 weights load with QuickGELU
               "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
               "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    open_clip.factory._MODEL_CONFIGS["tiny-vit"] = vis_cfg
    with open(os.path.join(out, "vision_config.json"), "w") as f:
        json.dump(vis_cfg, f, indent=1)

    # ---------------- Flamingo (open_flamingo's own factory, offline) ----------------
    from open_flamingo import create_model_and_transforms
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path="tiny-vit", clip_vision_encoder_pretrained=None,
        lang_encoder_path=lm_dir, tokenizer_path=lm_dir, cross_attn_every_n_layers=1,
        use_local_files=True)
    with torch.no_grad():  # non-zero gates so the image path changes the logits; trained-looking wte
        for n, p in model.named_parameters():
            if n.endswith("attn_gate") or n.endswith("ff_gate"):
                p.copy_(torch.tensor([0.5 + 0.5 * float(rng.random())]))
            elif n == "lang_encoder.transformer.wte.weight":
                p.add_(0.05 * torch.randn_like(p))
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.eval()
    # what flamingo_interface.py does after loading
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token

    # state dicts laid out like the real artifacts
    clip_full = model.vision_encoder.state_dict()
    save_file(bf16({f"visual.{k}": v for k, v in clip_full.items()}), os.path.join(out, "vision.safetensors"),
              metadata={"format": "pt"})
    # lang_encoder.old_decoder_blocks.* / lang_encoder.gated_cross_attn_layers.* are aliases of
    # lang_encoder.transformer.blocks.N.{decoder_layer,gated_cross_attn_layer}.* and are not stored
    ckpt = {k: v for k, v in model.state_dict().items() if k.startswith("perceiver.")
            or (k.startswith("lang_encoder.transformer.blocks.") and ".gated_cross_attn_layer." in k)
            or k == "lang_encoder.transformer.wte.weight"}
    save_file(bf16(ckpt), os.path.join(out, "flamingo_checkpoint.safetensors"), metadata={"format": "pt"})
    all_model_keys = sorted(model.state_dict().keys())
    # LM dir for the fixture: config + weights + tokenizer, no python
    lm_out = os.path.join(out, "lm")
    os.makedirs(lm_out)
    for fn in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"]:
        shutil.copy(os.path.join(lm_dir, fn), lm_out)

    # ---------------- images + prompts (exactly as flamingo_interface.prepare_input builds them) --------
    def make_image(i, w, h):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * (3 + i) + yy * 5) % 256, (yy * (7 + 2 * i)) % 256,
                        ((xx + yy) * (11 + i) + 40 * i) % 256], -1).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        img.save(os.path.join(out, "images", f"img{i}.png"))
        return img

    sizes = [(56, 56), (72, 60), (50, 64), (64, 64)]
    images = [make_image(i, w, h) for i, (w, h) in enumerate(sizes)]
    icds = [
        {"question": "What color is the ball?", "answer": "red", "image": 0},
        {"question": "How many dogs are there?", "answer": "2", "image": 1},
    ]
    queries = [
        {"question": "What is the man holding?", "image": 2},
        {"question": "Is it raining?", "image": 3},
    ]
    template = "Question:<Q> Short answer:<A>"
    icd_join = "<|endofchunk|>"

    def render(icd_list, query):
        text, imgs = "", []  # instruction is "" for flamingo_3B
        for it in icd_list:
            text += "<image>" + template.replace("<Q>", it["question"]).replace("<A>", it["answer"]).strip(" ") + icd_join
            imgs.append(it["image"])
        text += "<image>" + template.replace("<Q>", query["question"]).replace("<A>", "").strip(" ")
        imgs.append(query["image"])
        return text, imgs

    cases = {
        "description": "tiny random OpenFlamingo (flamingo_3B architecture); see FLAMINGO.md",
        "seed": args.seed,
        "lm_config": lm_cfg,
        "vision_config": vis_cfg,
        "perceiver": {"depth": 6, "dim_head": 64, "heads": 8, "num_latents": 64, "ff_mult": 4},
        "gated_xattn": {"dim_head": 64, "heads": 8, "ff_mult": 4, "only_attend_immediate_media": True,
                        "cross_attn_every_n_layers": 1},
        "tokenizer": {"base_vocab": base_vocab, "len_after_flamingo_tokens": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                      "endofchunk_id": tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
                      "image_id": tokenizer.convert_tokens_to_ids("<image>"),
                      "PAD_id": tokenizer.convert_tokens_to_ids("<PAD>")},
        "image_preprocess": {"mean": list(image_processor.transforms[-1].mean),
                             "std": list(image_processor.transforms[-1].std),
                             "repr": repr(image_processor)},
        "lm_state_keys": lm_state_keys,
        "flamingo_checkpoint_keys": sorted(ckpt.keys()),
        "flamingo_all_state_keys": all_model_keys,
        "cases": [],
    }

    for ci, query in enumerate(queries):
        text, img_idx = render(icds, query)
        enc = tokenizer([text], padding=True, add_special_tokens=False, return_tensors="pt")
        pix = torch.stack([image_processor(images[i]) for i in img_idx], 0)
        vision_x = pix.unsqueeze(0).unsqueeze(2)  # (B, T_img, F=1, C, H, W)
        with torch.no_grad():
            vis_tokens = model.vision_encoder(pix)[1]
            lat = model.perceiver(vis_tokens.unsqueeze(0).unsqueeze(2))
            o = model(vision_x=vision_x, lang_x=enc["input_ids"], attention_mask=enc["attention_mask"])
            last = o.logits[0, -1]
            o_noimg = model(vision_x=torch.zeros_like(vision_x), lang_x=enc["input_ids"],
                            attention_mask=enc["attention_mask"])
            gen = {}
            for name, kw in {"greedy": dict(num_beams=1, max_new_tokens=5, output_scores=True,
                                            return_dict_in_generate=True),
                             "beam3": dict(num_beams=3, max_new_tokens=5, length_penalty=0.0,
                                           min_new_tokens=0)}.items():
                ids = model.generate(vision_x=vision_x, lang_x=enc["input_ids"],
                                     attention_mask=enc["attention_mask"],
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     **kw)
                seq = ids.sequences if hasattr(ids, "sequences") else ids
                new = seq[0, enc["input_ids"].shape[1]:].tolist()
                gen[name] = {"kwargs": kw, "new_token_ids": new,
                             "decoded_skip_special": tokenizer.decode(new, skip_special_tokens=True)}
                if name == "greedy":  # per step: (argmax, max logit) of the processed scores
                    gen[name]["step_max"] = [[int(sc[0].argmax()), round(float(sc[0].max()), 5)]
                                             for sc in ids.scores]
        top = torch.topk(last, 5)
        cases["cases"].append({
            "name": f"two_shot_{ci}",
            # the same prompt as a `leverflow vqa` request (image paths relative to this folder)
            "request": {"examples": [{"image": f"images/img{it['image']}.png", "question": it["question"],
                                      "answer": it["answer"]} for it in icds],
                        "query": {"image": f"images/img{query['image']}.png", "question": query["question"]}},
            "text": text,
            "image_files": [f"images/img{i}.png" for i in img_idx],
            "image_sizes": [list(sizes[i]) for i in img_idx],
            "input_ids": enc["input_ids"][0].tolist(),
            "attention_mask": enc["attention_mask"][0].tolist(),
            "pixel_values_shape": list(pix.shape),
            "pixel_values_first8": [round(float(x), 6) for x in pix[0, 0, 0, :8]],
            "pixel_values_sum_per_image": [round(float(x), 4) for x in pix.sum((1, 2, 3))],
            "vision_tokens_shape": list(vis_tokens.shape),
            "vision_tokens_first8": [round(float(x), 6) for x in vis_tokens[0, 0, :8]],
            "perceiver_out_shape": list(lat.shape),
            "perceiver_out_first8": [round(float(x), 6) for x in lat[0, 0, 0, :8]],
            "logits_shape": list(o.logits.shape),
            "last_logits_first8": [round(float(x), 6) for x in last[:8]],
            "last_logits_top5": {"ids": top.indices.tolist(), "values": [round(float(x), 6) for x in top.values]},
            "last_argmax": int(last.argmax()),
            "last_logits_sum": round(float(last.sum()), 5),
            "last_logits_zero_images_first8": [round(float(x), 6) for x in o_noimg.logits[0, -1, :8]],
            "generate": gen,
        })

    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, fn)) for d, _, fs in os.walk(out) for fn in fs)
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
