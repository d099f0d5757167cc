"""OpenFlamingo prompts/s: open_flamingo on PyTorch (CPU) beside leverflow's
burn port, on the same prompts and the same model (issue 25).

The model is the tiny fixture `tests/fixtures/openflamingo_tiny` (flamingo_3B's
architecture and flags, random weights). The PyTorch side is rebuilt from its
files with open_flamingo's own factory, exactly as `make_flamingo.py` built it:
the MosaicGPT remote code is assembled from a local clone of
github.com/mosaicml/examples (tag v0.0.4) into a scratch directory, the
fixture's `lm/` files are copied beside it, then the open_clip vision weights
and OpenFlamingo's checkpoint are loaded on top. Before timing, the rebuilt
model must reproduce the fixture's recorded greedy and beam-3 generations.

One invocation measures both sides:

    python tools/bench_flamingo_torch.py --examples-git /path/to/examples/.git \\
        --leverflow target/debug/leverflow --queries 8 --reps 3

1. `leverflow bench vqa --vqa_model tests/fixtures/openflamingo_tiny` prints
   leverflow's lines (batch 1 as a loop, then batch 8);
2. open_flamingo answers the same prompts (built like leverflow's
   `flamingo_bench_prompts`: prompt i shows images i+1 and i+2 as examples and
   image i as the query) at batch 1 (a loop) and batch 8, one warm-up run,
   then `--reps` timed runs; the median is reported;
3. `leverflow vqa` answers the prompts as one batch and its generated ids are
   compared with open_flamingo's batch-1 ids (`ids_match_leverflow`).

Both sides use the original's settings: beam 3, 5 new tokens, length penalty
0, EOS `<|endoftext|>`. leverflow encodes each distinct image of a batch
once (its `images_encoded` says how many it ran); open_flamingo encodes every
prompt's images, so images shared by prompts cost more there.

Environment (see tests/fixtures/openflamingo_tiny/README.md §4): a venv with
transformers 4.33.3, tokenizers 0.13.3, open-flamingo 2.0.1 (--no-deps),
open_clip_torch 3.3.0 (--no-deps), timm, einops, einops-exts,
huggingface_hub 0.36.2, ftfy, regex, and torch/torchvision reachable (e.g.
through a .pth file naming the serve venv's site-packages).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = [("What color is the ball?", "red"), ("How many dogs are there?", "2")]
QUERIES = ["What is the man holding?", "Is it raining?"]
ICD_JOIN = "<|endofchunk|>"
GEN_KW = dict(num_beams=3, max_new_tokens=5, min_new_tokens=0, length_penalty=0.0)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def bench_prompts(fixture, n):
    """Same prompts as leverflow's `flamingo_bench_prompts`."""
    folder = os.path.join(fixture, "images")
    images = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    m = len(images)
    return [
        {
            "examples": [(images[(i + k + 1) % m], q, a) for k, (q, a) in enumerate(EXAMPLES)],
            "query": (images[i % m], QUERIES[i % len(QUERIES)]),
        }
        for i in range(n)
    ]


def render(prompt):
    """The original's flamingo prompt (make_flamingo.py's `render`)."""
    text = ""
    for _, q, a in prompt["examples"]:
        text += "<image>" + f"Question:{q} Short answer:{a}".strip(" ") + ICD_JOIN
    text += "<image>" + f"Question:{prompt['query'][1]} Short answer:".strip(" ")
    return text


def build_model(fixture, examples_git, scratch):
    """open_flamingo's model with the fixture's weights (fp32)."""
    sys.path.insert(0, HERE)
    from make_flamingo import assemble_mpt_code  # noqa: E402 (the generator's own assembly)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_MODULES_CACHE"] = os.path.join(scratch, "hf_modules")
    # open_flamingo's factory keys a hack on this substring of the path
    lm_dir = os.path.join(scratch, "mpt-1b-redpajama-200b")
    assemble_mpt_code(os.path.abspath(examples_git), lm_dir)
    for f in os.listdir(os.path.join(fixture, "lm")):
        shutil.copy(os.path.join(fixture, "lm", f), lm_dir)
    sys.path.insert(0, scratch)

    import open_clip
    import torch
    from safetensors.torch import load_file
    from open_flamingo import create_model_and_transforms

    with open(os.path.join(fixture, "vision_config.json")) as f:
        open_clip.factory._MODEL_CONFIGS["tiny-vit"] = json.load(f)
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path="tiny-vit", clip_vision_encoder_pretrained=None,
        lang_encoder_path=lm_dir, tokenizer_path=lm_dir, cross_attn_every_n_layers=1,
        use_local_files=True)
    vision = load_file(os.path.join(fixture, "vision.safetensors"))
    model.vision_encoder.load_state_dict(
        {k[len("visual."):]: v.float() for k, v in vision.items()}, strict=True)
    ckpt = load_file(os.path.join(fixture, "flamingo_checkpoint.safetensors"))
    _, unexpected = model.load_state_dict({k: v.float() for k, v in ckpt.items()}, strict=False)
    if unexpected:
        sys.exit(f"checkpoint keys the model does not have: {unexpected[:5]}")
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    return model, image_processor, tokenizer


def answer(model, image_processor, tokenizer, prompts):
    """One left-padded `generate` on a batch; new ids per prompt."""
    import torch
    from PIL import Image

    enc = tokenizer([render(p) for p in prompts], padding=True, add_special_tokens=False,
                    return_tensors="pt")
    pix = []
    for p in prompts:
        paths = [e[0] for e in p["examples"]] + [p["query"][0]]
        imgs = []
        for path in paths:
            with Image.open(path) as im:
                imgs.append(image_processor(im.convert("RGB")))
        pix.append(torch.stack(imgs, 0))
    vision_x = torch.stack(pix, 0).unsqueeze(2)  # (B, T_img, F=1, C, H, W)
    with torch.inference_mode():
        out = model.generate(vision_x=vision_x, lang_x=enc["input_ids"],
                             attention_mask=enc["attention_mask"],
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **GEN_KW)
    plen = enc["input_ids"].shape[1]
    return [out[b, plen:].tolist() for b in range(len(prompts))]


def trim(ids, eos):
    """Ids up to and including the first EOS (drops batch padding after it)."""
    for k, t in enumerate(ids):
        if t == eos:
            return ids[: k + 1]
    return ids


def check_fixture(model, image_processor, tokenizer, fixture):
    """The rebuilt model must give the fixture's recorded generations."""
    with open(os.path.join(fixture, "cases.json")) as f:
        cases = json.load(f)["cases"]
    ok = True
    for c in cases:
        req = c["request"]
        prompt = {
            "examples": [(os.path.join(fixture, e["image"]), e["question"], e["answer"])
                         for e in req["examples"]],
            "query": (os.path.join(fixture, req["query"]["image"]), req["query"]["question"]),
        }
        got = answer(model, image_processor, tokenizer, [prompt])[0]
        want = c["generate"]["beam3"]["new_token_ids"]
        same = trim(got, tokenizer.eos_token_id) == trim(want, tokenizer.eos_token_id)
        ok &= same
        log(f"check: {c['name']} beam-3 ids equal to the fixture's: {same}")
    return ok


def run_leverflow_bench(args):
    proc = subprocess.run(
        [args.leverflow, "bench", "vqa", "--vqa_model", args.fixture, "--queries", str(args.queries),
         "--batch_size", "8", "--reps", str(args.reps)],
        stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        print(line, flush=True)
    if proc.returncode != 0:
        sys.exit(f"leverflow bench vqa failed ({proc.returncode})")


def leverflow_ids(args, prompts):
    items = [{"examples": [{"image": os.path.abspath(p), "question": q, "answer": a}
                           for p, q, a in r["examples"]],
              "query": {"image": os.path.abspath(r["query"][0]), "question": r["query"][1]}}
             for r in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "req.json")
        with open(path, "w") as f:
            json.dump(items, f)
        proc = subprocess.run([args.leverflow, "vqa", "--vqa_model", args.fixture, "--request", path],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"leverflow vqa failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [json.loads(l)["generated_ids"] for l in proc.stdout.splitlines() if l.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default="tests/fixtures/openflamingo_tiny")
    ap.add_argument("--examples-git", required=True, help="git dir of a mosaicml/examples clone")
    ap.add_argument("--leverflow", default="target/debug/leverflow")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.queries = max(8, min(64, args.queries))  # leverflow clamps the same way

    run_leverflow_bench(args)

    import torch
    import transformers
    import open_flamingo  # noqa: F401

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        model, image_processor, tokenizer = build_model(args.fixture, args.examples_git, scratch)
        load_s = time.perf_counter() - t0
        fixture_ok = check_fixture(model, image_processor, tokenizer, args.fixture)
        prompts = bench_prompts(args.fixture, args.queries)
        lf = leverflow_ids(args, prompts)
        eos = tokenizer.eos_token_id
        for bs in (1, 8):
            last = []

            def work():
                last.clear()
                for s in range(0, len(prompts), bs):
                    last.extend(answer(model, image_processor, tokenizer, prompts[s: s + bs]))

            work()  # warm-up
            secs = []
            for _ in range(max(1, args.reps)):
                t = time.perf_counter()
                work()
                secs.append(time.perf_counter() - t)
            med = statistics.median(secs)
            match = [trim(a, eos) == trim(b, eos) for a, b in zip(last, lf)]
            print(json.dumps({
                "bench": "vqa_open_flamingo",
                "batch_size": bs,
                "reps": len(secs),
                "median_s": med,
                "min_s": min(secs),
                "max_s": max(secs),
                "prompts_per_s": len(prompts) / med,
                "items_per_run": len(prompts),
                "threads": args.threads,
                "load_s": load_s,
                "fixture_generations_reproduced": fixture_ok,
                "ids_match_leverflow": f"{sum(match)}/{len(match)}",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
