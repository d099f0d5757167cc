#!/usr/bin/env python3
"""Reference values of `--gt_prob_mode original` on the tiny Qwen2.5-VL fixture.

Computes, with HF transformers (PyTorch CPU, float32, eager attention), the
original project's `vqa_gt_prob` for a few fixture prompts and ground-truth
answers, exactly as the original does it (`build_vqa_prompt_with_label` +
`BaseInterface.get_cond_prob`):

* the prompt's messages (system prompt; user turn alternating images and
  "Question:<q> Short answer:<a>", the query's text ending in
  "Short answer:<answer>") rendered with the chat template and
  add_generation_prompt=False, then processed with the images;
* mask_length = the token count (add_special_tokens=False) of the
  plain-text prompt of `concat_prompt(..., is_last_for_generation=True)`:
  "<image>Question:<q> Short answer:<a>" (stripped of spaces) +
  "<|endofchunk|>" per example, then "<image>Question:<q> Short answer:";
* cross-entropy of label ids[j+1] summed over j >= mask_length - 1 (pad
  labels ignored), divided by (#non-pad ids - mask_length); p = exp(-that);
* vqa_gt_prob = sum over answers of p(answer) * weight.

Writes tests/fixtures/qwen2_5_vl_tiny/gt_prob_original.json, which
operators/src/models/qwen2_5_vl/model.rs's tests compare against.

    bash tools/serve_env.sh     # torch + transformers in ~/.cache/leverflow/serve-venv
    ~/.cache/leverflow/serve-venv/bin/python tools/gt_prob_original_refs.py
"""

import argparse
import json
import os
import sys

FIXTURE = "tests/fixtures/qwen2_5_vl_tiny"
# (case name, [(answer, weight)]): weights as the pipeline gives them
# (min(count / 3, 1)).
CASES = [
    ("two_shot", [("yes", 1.0), ("no", 2.0 / 3.0), ("red circle", 1.0 / 3.0)]),
    ("zero_shot", [("rectangle", 1.0), ("blue", 1.0 / 3.0)]),
    ("large_image", [("brown", 1.0)]),
]
IMAGE_MARKER = "<image>"
EXAMPLE_JOIN = "<|endofchunk|>"


def parse_case(case):
    """(system prompt, [(image, question, answer)], (image, question)) of row 0."""
    msgs = case["messages"][0]
    system = msgs[0]["content"]
    items = msgs[1]["content"]
    pairs = []
    image = None
    for it in items:
        if it["type"] == "image":
            image = it["image"]
        else:
            q, a = it["text"][len("Question:"):].split(" Short answer:", 1)
            pairs.append((image, q, a))
    examples, (qimg, qq, _) = pairs[:-1], pairs[-1]
    return system, examples, (qimg, qq)


def full_messages(system, examples, query, answer):
    content = []
    for _, q, a in examples:
        content.append({"type": "image"})
        content.append({"type": "text", "text": f"Question:{q} Short answer:{a}".strip(" ")})
    content.append({"type": "image"})
    content.append({"type": "text", "text": f"Question:{query[1]} Short answer:{answer}".strip(" ")})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def plain_prompt(examples, query):
    out = ""
    for _, q, a in examples:
        out += f"{IMAGE_MARKER}Question:{q} Short answer:{a}".strip(" ") + EXAMPLE_JOIN
    return out + f"{IMAGE_MARKER}Question:{query[1]} Short answer:"


def cond_prob(model, inputs, mask_length, pad_id):
    import torch

    with torch.inference_mode():
        logits = model(**inputs).logits
    ids = inputs["input_ids"]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = ids[..., 1:].contiguous()
    loss = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=pad_id)(
        shift_logits.view(-1, shift_logits.size(-1)).double(), shift_labels.view(-1)
    ).view(shift_labels.size())
    mask = torch.zeros_like(loss)
    mask[:, mask_length - 1:] = 1
    lens = (ids != pad_id).sum(-1).double() - mask_length
    ce = (loss * mask).sum(-1) / lens
    return float((-ce).exp()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=FIXTURE)
    ap.add_argument("--out", default=os.path.join(FIXTURE, "gt_prob_original.json"))
    args = ap.parse_args()

    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.model)
    tok = processor.tokenizer
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    pad_id = tok.pad_token_id
    with open(os.path.join(args.model, "cases.json")) as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    out = []
    for name, answers in CASES:
        system, examples, query = parse_case(cases[name])
        images = []
        for p in [e[0] for e in examples] + [query[0]]:
            with Image.open(os.path.join(args.model, p)) as im:
                images.append(im.convert("RGB"))
        mask_length = len(tok(plain_prompt(examples, query), add_special_tokens=False)["input_ids"])
        rows = []
        total = 0.0
        for answer, weight in answers:
            text = processor.apply_chat_template(
                full_messages(system, examples, query, answer), tokenize=False, add_generation_prompt=False
            )
            inputs = processor(text=[text], images=images, return_tensors="pt")
            p = cond_prob(model, inputs, mask_length, pad_id)
            rows.append({
                "answer": answer,
                "weight": weight,
                "seq_len": int(inputs["input_ids"].shape[1]),
                "cond_prob": p,
            })
            total += p * weight
            print(f"{name} {answer!r}: mask_length {mask_length}, "
                  f"seq {inputs['input_ids'].shape[1]}, p {p:.6e}", file=sys.stderr)
        out.append({"name": name, "mask_length": mask_length, "answers": rows, "gt_prob": total})
    doc = {
        "description": "vqa_gt_prob as the original project computes it (get_cond_prob with its "
                       "plain-text mask_length), on row 0 of the named cases; made by "
                       "tools/gt_prob_original_refs.py",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "cases": out,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
