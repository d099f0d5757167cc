#!/usr/bin/env python3
"""HF transformers (PyTorch CPU) baseline for `leverflow bench vqa`.

Answers exactly the prompts of leverflow's VQA benchmark (`bench_vqa` in
src/qwen.rs) with Hugging Face transformers and prints one JSON line per
setting, so BENCHMARKS.md can show both side by side:

* model: a Qwen2.5-VL checkpoint directory (default: the tiny random fixture
  tests/fixtures/qwen2_5_vl_tiny), loaded as float32 with
  attn_implementation "eager" and, as a second variant, "sdpa";
* images: the `easyvqa*.png` files of the model dir's `images/`, sorted;
* prompt i (of --queries, default 32): two in-context examples with
  images[(i+1)%n] and images[(i+2)%n] ("what shape is in the image?" ->
  "circle"), then the query images[i%n] "what color is the shape?", rendered
  with the processor's chat template exactly as leverflow renders a
  `PromptRequest` (default system prompt, image/text items alternating,
  "Question:<q> Short answer:<a>");
* generation: num_beams 3, max_new_tokens 5, min_new_tokens 0,
  length_penalty 0.0, do_sample False; everything else from the checkpoint's
  generation_config.json (repetition_penalty 1.05, eos [151645, 151643]).

Each timed run answers all prompts at batch 1 (a loop of single-prompt
`generate` calls) or at batch 8 (left-padded chunks of 8), including reading
the PNGs, the processor's image preprocessing and tokenisation.  One warm-up
run, then the median of --reps runs, with torch.set_num_threads(--threads).

Before timing, the script checks against the leverflow binary (--leverflow,
default target/debug/leverflow; skip with --no-check): the rendered prompt
text and input ids of prompt 0, and the generated ids of the first 8 prompts
at HF batch 1 and HF batch 8 vs `leverflow vqa` given those 8 prompts as a
JSON list (answered as one batch).  Mismatches are reported, not fatal.

Run from the repository root, in a throwaway virtual environment:

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers pillow safetensors
    cargo build --bin leverflow
    /tmp/hfvenv/bin/python tools/bench_hf_vqa.py \
        --model tests/fixtures/qwen2_5_vl_tiny --queries 32 --reps 3

Output lines look like
    {"bench": "vqa_hf", "batch_size": 1, "attn": "eager", "median_s": ...,
     "prompts_per_s": ..., "torch": "...", "transformers": "..."}
Check results go to stderr as lines starting with "check:".

At the real size (`--synthetic-3b DIR`): one invocation measures both
sides on the same random-weight checkpoint with every shape of
Qwen2.5-VL-3B-Instruct (bf16, 4 shards), 8 prompts:

    cargo build --release --bin leverflow
    ~/.cache/leverflow/serve-venv/bin/python tools/bench_hf_vqa.py \
        --synthetic-3b /tmp/qwen3b --leverflow target/release/leverflow --reps 1

1. `leverflow bench vqa --synthetic 3b --keep_dir DIR` writes the checkpoint
   into DIR (reused when DIR already holds one) and prints leverflow's
   lines, batch 1 and batch 8, each run in a fresh process with its peak RSS;
   then both batch sizes again with the vision cache off (`--vision_cache_mb 0`);
2. `leverflow vqa` answers the first 4 prompts (as one batch); their
   generated ids are kept;
3. HF loads DIR with transformers from the same config.json (f32, sdpa) in a
   fresh Python process per batch size (`--only-batch`), prints its line with
   `peak_rss_bytes` (getrusage of that process) and compares its generated
   ids of the first 4 prompts with leverflow's (`ids_match_leverflow`).
   HF at f32 needs about 23 GB: step 3 runs only when /proc/meminfo shows at
   least --min-free-gb (default 21) GB available, else it prints a
   `vqa_hf_skipped` line saying so.

Note: leverflow keeps a per-image vision-embedding cache within a run (each
distinct image is preprocessed and encoded once per run); HF transformers has
no such cache, so here every prompt preprocesses and encodes its 3 images.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

DEFAULT_SYSTEM_PROMPT = (
    "In the upcoming task, you will see four sets of dialogues, each containing two roles: user and "
    "assistant. The user is the questioner, who provides an image and asks a question based on it; the "
    "assistant is the responder, who answers according to the image and question provided by the user. "
    "Afterward, you will receive an image and a question from the user. Please act as the assistant and "
    "answer based on the four previous dialogue sets and your own knowledge. Strictly follow the answering "
    "format: if the examples use only one or two keywords, your reply must also use only one or two "
    "keywords; if the examples contain no more than three tokens, your reply must not exceed three tokens "
    "either."
)
SHAPE_Q, SHAPE_A = "what shape is in the image?", "circle"
COLOR_Q = "what color is the shape?"
GEN_KW = dict(num_beams=3, max_new_tokens=5, min_new_tokens=0, length_penalty=0.0, do_sample=False)
BATCH_SIZES = (1, 8)
CHECK_N = 8


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_requests(model_dir, queries):
    """Same requests as leverflow's bench_vqa: (example paths, query path)."""
    img_dir = os.path.join(model_dir, "images")
    images = sorted(
        os.path.join(img_dir, f) for f in os.listdir(img_dir) if f.startswith("easyvqa")
    )
    if len(images) < 3:
        sys.exit(f"{model_dir}: need at least 3 easyvqa_*.png images")
    n = len(images)
    return [
        {
            "examples": [(images[(i + k) % n], SHAPE_Q, SHAPE_A) for k in (1, 2)],
            "query": (images[i % n], COLOR_Q),
        }
        for i in range(queries)
    ]


def messages(req):
    """Chat messages of a request, as leverflow's `vqa_messages`."""
    content = []
    for _, q, a in req["examples"]:
        content.append({"type": "image"})
        content.append({"type": "text", "text": f"Question:{q} Short answer:{a}"})
    content.append({"type": "image"})
    content.append({"type": "text", "text": f"Question:{req['query'][1]} Short answer:"})
    return [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def image_paths(req):
    return [p for p, _, _ in req["examples"]] + [req["query"][0]]


def render(processor, req):
    return processor.apply_chat_template(messages(req), tokenize=False, add_generation_prompt=True)


def answer(model, processor, reqs):
    """One `generate` call on a (left-padded) batch; returns (input ids, new ids) per prompt."""
    import torch
    from PIL import Image

    texts = [render(processor, r) for r in reqs]
    images = []
    for r in reqs:
        for p in image_paths(r):
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, **GEN_KW)
    plen = inputs["input_ids"].shape[1]
    res = []
    for b in range(len(reqs)):
        mask = inputs["attention_mask"][b].bool()
        res.append((inputs["input_ids"][b][mask].tolist(), out[b, plen:].tolist()))
    return res


def load_processor(model_dir):
    """AutoProcessor with left padding.  transformers 5 builds the Qwen2-VL video
    processor too, which needs torchvision; without it, assemble the processor
    from the tokenizer and the (PIL) image processor, with no video processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")
    except ImportError as e:
        log(f"AutoProcessor failed ({str(e).strip().splitlines()[0]}); building it without a video processor")
        orig = ProcessorMixin.check_argument_for_proper_class

        def check_arg(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return orig(self, name, arg)

        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        Qwen2_5_VLProcessor.check_argument_for_proper_class = check_arg
        processor = Qwen2_5_VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model_dir),
            tokenizer=tok,
            video_processor=None,
            chat_template=tok.chat_template,
        )
    processor.tokenizer.padding_side = "left"
    return processor


def trim(ids, eos):
    """Generated ids up to and including the first EOS (drops batch padding after it)."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def run_leverflow(binary, model_dir, reqs):
    """`leverflow vqa` on a JSON list of requests (answered as one batch)."""
    items = [
        {
            "examples": [{"image": os.path.abspath(p), "question": q, "answer": a} for p, q, a in r["examples"]],
            "query": {"image": os.path.abspath(r["query"][0]), "question": r["query"][1]},
        }
        for r in reqs
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "req.json")
        with open(path, "w") as f:
            json.dump(items, f)
        proc = subprocess.run(
            [binary, "vqa", "--vqa_model", model_dir, "--request", path],
            capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"leverflow vqa failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def check(model, processor, reqs, args, eos, attn):
    """Compares prompt text / ids with the leverflow binary; prints 'check:' lines; returns bool."""
    n = min(CHECK_N, len(reqs))
    try:
        lf = run_leverflow(args.leverflow, args.model, reqs[:n])
    except Exception as e:  # noqa: BLE001 - report, don't fail the timing
        log(f"check[{attn}]: could not run leverflow: {e}")
        return None
    ok = True
    text0 = render(processor, reqs[0])
    same_text = text0 == lf[0]["prompt_text"]
    ok &= same_text
    log(f"check[{attn}]: prompt 0 text equal to leverflow prompt_text: {same_text}")
    hf1 = [answer(model, processor, [r])[0] for r in reqs[:n]]
    hf8 = answer(model, processor, reqs[:n])
    same_inp = [h[0] == l["input_ids"] for h, l in zip(hf1, lf)]
    ok &= all(same_inp)
    log(f"check[{attn}]: input_ids equal (prompts 0..{n - 1}): {same_inp}")
    for name, hf in (("HF batch 1", hf1), (f"HF batch {n}", hf8)):
        rows = [(trim(h[1], eos), trim(l["generated_ids"], eos)) for h, l in zip(hf, lf)]
        same = [a == b for a, b in rows]
        ok &= all(same)
        log(f"check[{attn}]: generated_ids {name} == leverflow batch {n}: {sum(same)}/{n} match")
        for i, (a, b) in enumerate(rows):
            if a != b:
                log(f"check[{attn}]:   prompt {i}: hf {a} leverflow {b}")
    return ok


SYNTH_QUERIES = 8
SYNTH_CHECK_N = 4


def mem_available_gb():
    """MemAvailable of /proc/meminfo in GB (None where it does not exist)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        return None
    return None


def synthetic_3b(args):
    """Both sides at the 3B's size on the checkpoint in args.synthetic_3b."""
    model_dir = args.synthetic_3b
    proc = subprocess.run(
        [args.leverflow, "bench", "vqa", "--synthetic", "3b", "--keep_dir", model_dir,
         "--batch_size", "8", "--reps", str(max(1, args.reps))],
        stdout=subprocess.PIPE, text=True,
    )
    for line in proc.stdout.splitlines():
        print(line, flush=True)
    if proc.returncode != 0:
        sys.exit(f"leverflow bench vqa --synthetic 3b failed ({proc.returncode})")
    # The vision cache off (HF has none): every prompt encodes its own images.
    for bs in BATCH_SIZES:
        proc = subprocess.run(
            [args.leverflow, "bench", "vqa", "--vqa_model", model_dir, "--batch_size", str(bs),
             "--batch_only", "--queries", str(SYNTH_QUERIES), "--reps", str(max(1, args.reps)),
             "--vision_cache_mb", "0"],
            stdout=subprocess.PIPE, text=True,
        )
        for line in proc.stdout.splitlines():
            print(line, flush=True)
        if proc.returncode != 0:
            sys.exit(f"leverflow bench vqa with the vision cache off failed ({proc.returncode})")
    reqs = build_requests(model_dir, SYNTH_QUERIES)
    lf = run_leverflow(args.leverflow, model_dir, reqs[:SYNTH_CHECK_N])
    expect = os.path.join(model_dir, "leverflow_ids.json")
    with open(expect, "w") as f:
        json.dump([l["generated_ids"] for l in lf], f)
    free = mem_available_gb()
    if free is not None and free < args.min_free_gb:
        print(json.dumps({
            "bench": "vqa_hf_skipped",
            "reason": f"{free:.1f} GB available, HF f32 at the 3B size needs about 23 GB "
                      f"(--min-free-gb {args.min_free_gb})",
        }), flush=True)
        return
    for bs in BATCH_SIZES:
        sub = subprocess.run(
            [sys.executable, __file__, "--model", model_dir, "--attn", "sdpa", "--only-batch", str(bs),
             "--queries", str(SYNTH_QUERIES), "--reps", str(max(1, args.reps)), "--threads",
             str(args.threads), "--expect-ids", expect, "--no-check"],
        )
        if sub.returncode != 0:
            log(f"HF at batch {bs} failed ({sub.returncode})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tests/fixtures/qwen2_5_vl_tiny")
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    ap.add_argument("--leverflow", default="target/debug/leverflow")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--synthetic-3b", metavar="DIR",
                    help="measure leverflow and HF at the 3B's size on the checkpoint in DIR")
    ap.add_argument("--min-free-gb", type=float, default=21.0)
    ap.add_argument("--only-batch", type=int, help="measure this batch size only (no warm-up run)")
    ap.add_argument("--expect-ids", help="JSON list of leverflow's generated ids of the first prompts")
    args = ap.parse_args()
    if args.synthetic_3b:
        synthetic_3b(args)
        return

    import torch
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    queries = max(8, min(64, args.queries))  # leverflow clamps the same way
    reqs = build_requests(args.model, queries)
    processor = load_processor(args.model)
    log(f"processor: {type(processor).__name__}, image processor {type(processor.image_processor).__name__}")

    for attn in args.attn:
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                args.model, torch_dtype=torch.float32, attn_implementation=attn
            ).eval()
        except Exception as e:  # noqa: BLE001
            log(f"attn={attn}: cannot load: {e}")
            continue
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        matched = None
        if not args.no_check:
            matched = check(model, processor, reqs, args, eos, attn)
        for bs in [args.only_batch] if args.only_batch else BATCH_SIZES:
            last = []

            def work():
                last.clear()
                for s in range(0, len(reqs), bs):
                    last.extend(answer(model, processor, reqs[s : s + bs]))

            if not args.only_batch:
                work()  # warm-up
            secs = []
            for _ in range(max(1, args.reps)):
                t0 = time.perf_counter()
                work()
                secs.append(time.perf_counter() - t0)
            med = statistics.median(secs)
            if args.expect_ids:
                with open(args.expect_ids) as f:
                    want = json.load(f)
                matched = all(trim(h[1], eos) == trim(w, eos) for h, w in zip(last, want))
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps({
                "bench": "vqa_hf",
                "batch_size": bs,
                "attn": attn,
                "reps": len(secs),
                "median_s": med,
                "min_s": min(secs),
                "max_s": max(secs),
                "prompts_per_s": queries / med,
                "items_per_run": queries,
                "threads": args.threads,
                "ids_match_leverflow": matched,
                "peak_rss_bytes": peak,
                "model": args.model,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
