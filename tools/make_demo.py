#!/usr/bin/env python3
"""Build the embedded demo inputs of leverflow (the folder ``demo/``) from the easy-VQA data set.

``leverflow generate --demo`` runs the whole pipeline on these files, without downloading anything.  Every file is
written in the format the original Python project ("Lever-Plus") reads, so the demo exercises the same loaders as a
real run:

* ``data/questions.json``, ``data/annotations.json``: the first 300 easy-VQA training questions in the official VQA
  question/annotation format; ``data/heldout_*.json``: the first 100 easy-VQA test questions, for evaluation.
* ``data/images/COCO_train2014_{image_id:012d}.png``: the easy-VQA images those questions use (PNG bytes copied
  verbatim from the package).
* ``query_embeddings.pt`` / ``candidate_embeddings.pt``: ``torch.save`` files of a float32 tensor [300, 64] (row i =
  dataset index i); both hold the same tensor because the whole demo set is the candidate pool.
* ``sft.ckpt``: a PyTorch-Lightning-style checkpoint of a pointer selector (d_model 64, hidden 32, 2 layers, 1 head)
  whose random weights are shaped so that the selector prefers examples similar to the query.
* ``config.json``: the selector's shape; ``beam_data.json``: beam data in the original format for queries 0..47.
* ``SHA256SUMS``: checksums of all of the above (``cd demo && sha256sum -c SHA256SUMS``).

The output is byte-for-byte deterministic: only the easy-VQA files, numpy's legacy ``RandomState`` streams (frozen by
numpy's compatibility policy) and correctly rounded arithmetic (``math.fsum``) feed it, and the ``torch.save`` zip
files are written by hand in exactly torch's layout (torch itself stamps a random serialization id into each file).
torch is therefore not needed to build the demo; ``--check`` uses it, when installed, to load every file back with
``torch.load`` and to run the pointer selector with ``torch.nn.MultiheadAttention``.

Usage (see demo/README.md):

    pip download easy-vqa==1.0 --no-deps -d /tmp/easyvqa
    python tools/make_demo.py --wheel /tmp/easyvqa/easy_vqa-1.0-py3-none-any.whl --out demo
    python tools/make_demo.py --out demo --check        # installed easy-vqa package, plus the torch checks

Requires numpy and Pillow.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------
# Parameters of the demo (changing any of them changes the committed files).

N_TRAIN = 300  # first N easy-VQA training questions, in the package's own order
N_HELDOUT = 100  # first N easy-VQA test questions
N_BEAM_QUERIES = 48  # beam data for dataset indices 0..N-1
N_BEAMS = 5
BEAM_NEIGHBOURS = 10  # beam pairs are drawn from the query's 10 most similar other items
HELDOUT_IMAGE_ID_OFFSET = 1_000_000  # heldout image_id = offset + easy-VQA test image id (no clash with train ids)
QUESTION_ID_STRIDE = 1000  # question_id = image_id * 1000 + k (k = rank of the question among its image's questions)
IMAGE_NAME = "COCO_train2014_{image_id:012d}.png"

HIST_BINS = 4  # per RGB channel -> 64 histogram cells
BOW_BUCKETS = 32
EMBED_DIM = 64
SEED = 0

SELECTOR = {"d_model": 64, "hidden_dim": 32, "num_layers": 2, "num_heads": 1, "shot_num": 2}
OUT_PROJ_SCALE = 0.1  # attention residual kept small so the query stays close to its projected embedding
SCORE_PROJ_NOISE = 0.1  # query_proj / cand_proj = identity + this times a default-initialised random matrix

# A subset of the official VQA question types (mscoco_question_types.txt); the longest matching prefix wins.
VQA_QUESTION_TYPES = [
    "what color is the",
    "what color is",
    "what is the",
    "what is",
    "what",
    "is there a",
    "is there",
    "does the",
    "is",
]

EASYVQA_LICENSE = "easy_vqa-1.0.dist-info/LICENSE"
EASYVQA_TRAIN = "easy_vqa/data/train/questions.json"
EASYVQA_TEST = "easy_vqa/data/test/questions.json"


# ----------------------------------------------------------------------------------------------------------------
# easy-VQA source: the wheel (a zip) or the installed package.


class EasyVqaSource:
    """Reads files of the easy-vqa 1.0 distribution by their path inside the wheel."""

    def __init__(self, wheel: str | None):
        self._zip = zipfile.ZipFile(wheel) if wheel else None
        self._dist = None
        if self._zip is None:
            import importlib.metadata

            self._dist = importlib.metadata.distribution("easy-vqa")
            if self._dist.version != "1.0":
                sys.exit(f"easy-vqa {self._dist.version} is installed; the demo is defined on easy-vqa 1.0")

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return Path(self._dist.locate_file(name)).read_bytes()

    def questions(self, split: str) -> list:
        return json.loads(self.read(EASYVQA_TRAIN if split == "train" else EASYVQA_TEST))

    def image(self, split: str, easyvqa_image_id: int) -> bytes:
        return self.read(f"easy_vqa/data/{split}/images/{easyvqa_image_id}.png")


# ----------------------------------------------------------------------------------------------------------------
# VQA-format data.


def question_type(question: str) -> str:
    words = question.rstrip("?").split()
    for qt in VQA_QUESTION_TYPES:  # ordered longest first within each family
        qw = qt.split()
        if words[: len(qw)] == qw:
            return qt
    return "none of the above"


def to_vqa(rows: list, image_id_offset: int, subtype: str, description: str):
    """easy-VQA rows [question, answer, image_id] -> (questions json, annotations json, [(image_id, easyvqa id)])."""
    questions, annotations, images = [], [], []
    per_image = collections.Counter()
    last_qid = -1
    for question, answer, ev_image in rows:
        image_id = image_id_offset + ev_image
        qid = image_id * QUESTION_ID_STRIDE + per_image[image_id]
        per_image[image_id] += 1
        if qid <= last_qid or per_image[image_id] > QUESTION_ID_STRIDE:
            raise SystemExit(f"question ids would not ascend at image {ev_image} ({question!r})")
        last_qid = qid
        if not images or images[-1][0] != image_id:
            images.append((image_id, ev_image))
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": question_type(question),
                "answer_type": "yes/no" if answer in ("yes", "no") else "other",
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)],
                "multiple_choice_answer": answer,
            }
        )
    info = {"description": description, "version": "1.0"}
    licence = {"name": "MIT (easy-VQA, Copyright (c) 2019 Victor Zhou); see LICENSE-easy-vqa", "url": ""}
    qjson = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": subtype,
        "license": licence,
        "questions": questions,
    }
    ajson = {"info": info, "data_type": "mscoco", "data_subtype": subtype, "annotations": annotations}
    if len({im for im, _ in images}) != len(images):
        raise SystemExit("an image's questions are not contiguous in easy-VQA's order")
    return qjson, ajson, images


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Embeddings (deterministic: integer features, exact random signs, math.fsum reductions).


def l2_normalise(vec: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else list(vec)


def colour_histogram(png: bytes) -> list[float]:
    """4x4x4 RGB histogram (channel value // 64), as fractions of the pixel count; cell = r*16 + g*4 + b."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64).reshape(-1, 3)
    cells = (rgb[:, 0] // 64) * 16 + (rgb[:, 1] // 64) * 4 + rgb[:, 2] // 64
    counts = np.bincount(cells, minlength=HIST_BINS**3)
    return [int(c) / len(cells) for c in counts]


def question_bow(question: str) -> list[float]:
    """Hashed bag of words: token = [a-z0-9]+ of the lower-cased question, bucket = md5(token) as integer mod 32."""
    counts = [0] * BOW_BUCKETS
    for token in re.findall(r"[a-z0-9]+", question.lower()):
        counts[int(hashlib.md5(token.encode("utf-8")).hexdigest(), 16) % BOW_BUCKETS] += 1
    return [float(c) for c in counts]


def projection_matrix() -> list[list[float]]:
    """[64][96] random signs +-1/8 (exact), numpy RandomState(0).randint(0, 2) in row-major order."""
    signs = np.random.RandomState(SEED).randint(0, 2, size=(EMBED_DIM, HIST_BINS**3 + BOW_BUCKETS))
    return [[(1.0 if s else -1.0) / 8.0 for s in row] for row in signs.tolist()]


def embed(png: bytes, question: str, proj: list[list[float]]) -> list[float]:
    feat = l2_normalise(colour_histogram(png)) + l2_normalise(question_bow(question))
    projected = [math.fsum(w * x for w, x in zip(row, feat)) for row in proj]
    return l2_normalise(projected)


# ----------------------------------------------------------------------------------------------------------------
# torch.save files written by hand (zip64 archive in the layout of torch's PyTorchStreamWriter, pickle protocol 2).


class _Global:
    """A module-level name referenced by the pickle (written as a GLOBAL opcode)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only checks that a reduce function is callable
        raise TypeError(f"{self.module}.{self.name} is a placeholder")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _Global("torch", "FloatStorage")


class Tensor:
    """A float32 tensor to be pickled as torch does (own storage, offset 0, contiguous strides)."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _TorchPickler(pickle._Pickler):  # pure-Python pickler: the C one cannot write our GLOBALs
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[bytes] = []

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _FLOAT_STORAGE, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            arr = obj.array
            key = str(len(self.storages))
            self.storages.append(arr.astype("<f4").tobytes())
            shape = tuple(int(s) for s in arr.shape)
            stride = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
            args = (_Storage(key, int(arr.size)), 0, shape, stride, False, collections.OrderedDict())
            return (_REBUILD_TENSOR, args)
        return NotImplemented

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref


def _zip_records(records: list[tuple[str, bytes]]) -> bytes:
    """Stored zip64 archive as torch writes it: 64-byte aligned data ("FB" padding extra field), data descriptors,
    zero timestamps, zip64 end records."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        name_b = name.encode("utf-8")
        offset = len(out)
        start = offset + 30 + len(name_b) + 4
        pad = (-start) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data) & 0xFFFFFFFF
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name_b), len(extra))
        out += name_b + extra + data
        out += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc, len(data), len(data),
            len(name_b), 0, 0, 0, 0, 0, offset,
        )
        central += name_b
    cd_offset = len(out)
    out += central
    eocd64_offset = len(out)
    n = len(records)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(out)


def torch_save_bytes(obj, archive_name: str, serialization_id: str | None = None) -> bytes:
    """Bytes of ``torch.save(obj, "<archive_name>.pt")`` for objects made of dicts, lists, str, int, float, bool,
    None and :class:`Tensor`.  The serialization id defaults to a hash of the content (torch's own is random)."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    records = [
        ("data.pkl", buf.getvalue()),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{i}", data) for i, data in enumerate(pickler.storages)]
    records.append(("version", b"3\n"))
    if serialization_id is None:
        digest = hashlib.sha256(b"".join(n.encode() + b"\0" + d for n, d in records)).digest()
        serialization_id = "%020d%020d" % struct.unpack(">QQ", digest[:16])
    records.append((".data/serialization_id", serialization_id.encode("ascii")))
    return _zip_records([(f"{archive_name}/{name}", data) for name, data in records])


# ----------------------------------------------------------------------------------------------------------------
# Pointer selector checkpoint.


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def selector_weights() -> dict[str, np.ndarray]:
    """Random pointer-selector weights (numpy RandomState(0), draws in the order below), shaped so that the
    selector's scores follow the cosine similarity of the embeddings.  See demo/README.md."""
    d, h, layers = SELECTOR["d_model"], SELECTOR["hidden_dim"], SELECTOR["num_layers"]
    rs = np.random.RandomState(SEED)

    def uniform(bound: float, shape) -> np.ndarray:
        return rs.uniform(-bound, bound, size=shape)

    w = {}
    # input_proj: 32 rows of a 64x64 Hadamard matrix (random rows, random column signs, scaled to orthonormal rows),
    # then centred over the 32 outputs so every projected vector has mean 0 (LayerNorm then only rescales it).
    rows = rs.permutation(d)[:h]
    col_signs = rs.randint(0, 2, size=d) * 2 - 1
    m = hadamard(d)[rows] * col_signs[None, :] / math.sqrt(d)
    w["input_proj.weight"] = m - m.mean(axis=0, keepdims=True)
    for layer in range(layers):
        p = f"cross_attn_layers.{layer}."
        w[p + "in_proj_weight"] = uniform(math.sqrt(6.0 / (h + 3 * h)), (3 * h, h))  # xavier_uniform (torch MHA)
        w[p + "in_proj_bias"] = np.zeros(3 * h)  # torch MHA default
        w[p + "out_proj.weight"] = uniform(1.0 / math.sqrt(h), (h, h)) * OUT_PROJ_SCALE  # Linear default, scaled
        w[p + "out_proj.bias"] = np.zeros(h)  # torch MHA default
    for layer in range(layers):
        w[f"attn_norms.{layer}.weight"] = np.ones(h)
        w[f"attn_norms.{layer}.bias"] = np.zeros(h)
    w["query_proj.weight"] = np.eye(h) + SCORE_PROJ_NOISE * uniform(1.0 / math.sqrt(h), (h, h))
    w["cand_proj.weight"] = np.eye(h) + SCORE_PROJ_NOISE * uniform(1.0 / math.sqrt(h), (h, h))
    w["query_update_gate.weight"] = uniform(1.0 / math.sqrt(2 * h), (h, 2 * h))  # Linear default
    w["query_update_gate.bias"] = uniform(1.0 / math.sqrt(2 * h), (h,))
    return {k: v.astype(np.float32) for k, v in w.items()}


def checkpoint(weights: dict[str, np.ndarray]) -> dict:
    return {
        "state_dict": {f"lever_lm.pointer_selector.{k}": Tensor(v) for k, v in weights.items()},
        "epoch": 0,
        "global_step": 0,
        "hyper_parameters": {
            "d_model": SELECTOR["d_model"],
            "hidden_dim": SELECTOR["hidden_dim"],
            "num_layers": SELECTOR["num_layers"],
            "num_heads": SELECTOR["num_heads"],
            "shot_num": SELECTOR["shot_num"],
            "note": "leverflow demo: random weights, shaped so the selector prefers similar examples",
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Beam data.


def cosine_matrix(emb: np.ndarray) -> list[list[float]]:
    rows = emb.astype(np.float64).tolist()
    return [[math.fsum(a * b for a, b in zip(r, s)) for s in rows] for r in rows]


def beam_data(cos: list[list[float]]) -> dict:
    """For each query q: the 5 best ordered pairs [a, b] (a, b != q, a more similar than b) among q's 10 most
    cosine-similar items, ranked by cos(q,a) + cos(q,b) (ties: smaller ids first); score = the mean cosine."""
    out = {}
    for q in range(N_BEAM_QUERIES):
        others = sorted((j for j in range(len(cos)) if j != q), key=lambda j: (-cos[q][j], j))
        top = others[:BEAM_NEIGHBOURS]
        pairs = [(top[i], top[k]) for i in range(len(top)) for k in range(i + 1, len(top))]
        pairs.sort(key=lambda p: (-(cos[q][p[0]] + cos[q][p[1]]), p))
        best = pairs[:N_BEAMS]
        out[str(q)] = {
            "id_list": [[a, b, q] for a, b in best],
            "score_list": [round((cos[q][a] + cos[q][b]) / 2.0, 6) for a, b in best],
        }
    return out


# ----------------------------------------------------------------------------------------------------------------


def build(source: EasyVqaSource, out: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    train_rows = source.questions("train")[:N_TRAIN]
    test_rows = source.questions("test")[:N_HELDOUT]

    q, a, train_images = to_vqa(train_rows, 0, "train2014", "leverflow demo: first 300 easy-VQA train questions")
    files["data/questions.json"], files["data/annotations.json"] = json_bytes(q), json_bytes(a)
    qh, ah, test_images = to_vqa(
        test_rows, HELDOUT_IMAGE_ID_OFFSET, "train2014", "leverflow demo: first 100 easy-VQA test questions (heldout)"
    )
    files["data/heldout_questions.json"], files["data/heldout_annotations.json"] = json_bytes(qh), json_bytes(ah)
    pngs = {}
    for split, images in (("train", train_images), ("test", test_images)):
        for image_id, ev_id in images:
            pngs[image_id] = source.image(split, ev_id)
            files["data/images/" + IMAGE_NAME.format(image_id=image_id)] = pngs[image_id]
    files["data/LICENSE-easy-vqa"] = source.read(EASYVQA_LICENSE)

    # Dataset index = position after a stable sort by question_id = easy-VQA order (ids ascend).
    anns = sorted(a["annotations"], key=lambda x: x["question_id"])
    texts = {x["question_id"]: x["question"] for x in q["questions"]}
    proj = projection_matrix()
    emb = np.array([embed(pngs[x["image_id"]], texts[x["question_id"]], proj) for x in anns], dtype=np.float32)
    files["query_embeddings.pt"] = torch_save_bytes(Tensor(emb), "query_embeddings")
    files["candidate_embeddings.pt"] = torch_save_bytes(Tensor(emb), "candidate_embeddings")

    files["sft.ckpt"] = torch_save_bytes(checkpoint(selector_weights()), "sft")
    files["config.json"] = (json.dumps(SELECTOR) + "\n").encode("utf-8")
    files["beam_data.json"] = (json.dumps(beam_data(cosine_matrix(emb))) + "\n").encode("utf-8")

    sums = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    files["SHA256SUMS"] = sums.encode("ascii")

    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    stale = [
        p for p in (out / "data" / "images").iterdir() if p.relative_to(out).as_posix() not in files
    ]
    for p in stale:  # images of an earlier, different build
        p.unlink()
    return files


# ----------------------------------------------------------------------------------------------------------------
# Optional checks with torch.


def check(out: Path, files: dict[str, bytes]) -> None:
    try:
        import torch
    except ImportError:
        sys.exit("--check needs torch (pip install torch)")
    import tempfile

    # 1. The hand-written zip layout equals torch.save's output (up to torch's random serialization id).
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "probe.pt"
        torch.save({"a": t, "b": [1, 2.5, "x", None, True], "c": {"d": t[0].clone()}}, ref_path)
        ref = ref_path.read_bytes()
    sid = zipfile.ZipFile(io.BytesIO(ref)).read("probe/.data/serialization_id").decode()
    mine = torch_save_bytes(
        {"a": Tensor(t.numpy()), "b": [1, 2.5, "x", None, True], "c": {"d": Tensor(t[0].numpy())}}, "probe", sid
    )
    assert mine == ref, "hand-written torch.save bytes differ from torch.save"
    print("ok: hand-written .pt bytes == torch.save bytes (same serialization id)")

    # 2. Every file loads with torch.load and holds what was meant.
    q = torch.load(out / "query_embeddings.pt", weights_only=True)
    c = torch.load(out / "candidate_embeddings.pt", weights_only=True)
    assert q.dtype == torch.float32 and tuple(q.shape) == (N_TRAIN, EMBED_DIM) and torch.equal(q, c)
    assert torch.allclose(q.norm(dim=1), torch.ones(N_TRAIN), atol=1e-6)
    ck = torch.load(out / "sft.ckpt", weights_only=True)
    sd = {k.removeprefix("lever_lm.pointer_selector."): v for k, v in ck["state_dict"].items()}
    print("ok: torch.load:", tuple(q.shape), "epoch", ck["epoch"], "global_step", ck["global_step"], len(sd), "tensors")

    # 3. Run the selector (torch modules) and compare its first-step scores with the embeddings' cosine similarity.
    cfg = json.loads(files["config.json"])
    d, h, nl, nh = cfg["d_model"], cfg["hidden_dim"], cfg["num_layers"], cfg["num_heads"]
    inp = torch.nn.Linear(d, h, bias=False)
    mhas = [torch.nn.MultiheadAttention(h, nh, batch_first=True) for _ in range(nl)]
    lns = [torch.nn.LayerNorm(h) for _ in range(nl)]
    qp, cp = torch.nn.Linear(h, h, bias=False), torch.nn.Linear(h, h, bias=False)
    gate = torch.nn.Linear(2 * h, h)
    with torch.no_grad():
        inp.weight.copy_(sd["input_proj.weight"])
        for i in range(nl):
            prefix = f"cross_attn_layers.{i}."
            mhas[i].load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
            lns[i].weight.copy_(sd[f"attn_norms.{i}.weight"])
            lns[i].bias.copy_(sd[f"attn_norms.{i}.bias"])
        qp.weight.copy_(sd["query_proj.weight"])
        cp.weight.copy_(sd["cand_proj.weight"])
        gate.weight.copy_(sd["query_update_gate.weight"])
        gate.bias.copy_(sd["query_update_gate.bias"])
        for m in mhas:
            m.eval()
        ch = inp(c)[None]  # [1, K, H]
        qh = inp(q)[:, None]  # [N, 1, H]
        for m, ln in zip(mhas, lns):
            a, _ = m(qh, ch.expand(len(q), -1, -1), ch.expand(len(q), -1, -1), need_weights=False)
            qh = ln(a + qh)
        state = torch.nn.functional.normalize(qp(qh[:, 0]), dim=-1)
        cn = torch.nn.functional.normalize(cp(ch[0]), dim=-1)
        logits = state @ cn.T / 0.1
        cos = q @ c.T
        eye = torch.eye(N_TRAIN, dtype=torch.bool)
        lx, cx = logits[~eye].view(N_TRAIN, -1), cos[~eye].view(N_TRAIN, -1)
        pearson = torch.stack([torch.corrcoef(torch.stack([lx[i], cx[i]]))[0, 1] for i in range(N_TRAIN)])
        top_sel, top_cos = lx.argmax(1), cx.argmax(1)
        same_top = (top_sel == top_cos).float().mean().item()
        cos_of_sel = cx.gather(1, top_sel[:, None]).squeeze(1)
        rank_of_sel = (cx > cos_of_sel[:, None]).sum(1).float()
        self_top = (logits.argmax(1) == torch.arange(N_TRAIN)).float().mean().item()
    print(
        f"selector vs cosine (self excluded): mean per-query Pearson {pearson.mean():.3f} (min {pearson.min():.3f}); "
        f"top-1 agrees {same_top:.1%}; median cosine rank of the selector's top-1 {rank_of_sel.median():.0f}; "
        f"query ranks itself first {self_top:.1%}"
    )
    assert pearson.mean() > 0.8, "selector scores do not follow cosine similarity"

    # 4. beam data and VQA files are consistent.
    beams = json.loads(files["beam_data.json"])
    assert list(beams) == [str(i) for i in range(N_BEAM_QUERIES)]
    for k, v in beams.items():
        assert all(ids[2] == int(k) and int(k) not in ids[:2] and ids[0] != ids[1] for ids in v["id_list"])
        assert v["score_list"] == sorted(v["score_list"], reverse=True) and len(v["id_list"]) == N_BEAMS
    for qn, an in (("questions", "annotations"), ("heldout_questions", "heldout_annotations")):
        qs = json.loads(files[f"data/{qn}.json"])["questions"]
        ans = json.loads(files[f"data/{an}.json"])["annotations"]
        assert [x["question_id"] for x in qs] == [x["question_id"] for x in ans] == sorted(x["question_id"] for x in qs)
        for x in qs:
            assert (out / "data" / "images" / IMAGE_NAME.format(image_id=x["image_id"])).is_file()
    print("ok: beam data and VQA files consistent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help="easy_vqa-1.0-py3-none-any.whl (default: the installed easy-vqa package)")
    ap.add_argument("--out", default="demo", help="output folder (default: demo)")
    ap.add_argument("--check", action="store_true", help="verify the output with torch (needs torch)")
    args = ap.parse_args()
    out = Path(args.out)
    files = build(EasyVqaSource(args.wheel), out)
    total = sum(len(b) for b in files.values())
    print(f"wrote {len(files)} files, {total} bytes, under {out}/")
    print("sha256 of SHA256SUMS:", hashlib.sha256(files["SHA256SUMS"]).hexdigest())
    if args.check:
        check(out, files)


if __name__ == "__main__":
    main()
