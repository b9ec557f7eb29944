"""Mixture files: several prepared datasets sampled in fixed proportions.

    name = "web-docs"            # mixture dir = output/name (holds mixture.json after prep-mixture)
    output = "data"              # default output root of the datasets below
    tokenizer = "data/tok.json"  # default tokenizer of the datasets below

    [[dataset]]                  # an already prepared dataset ...
    path = "data/docs"
    weight = 3.0
    temperature = 1.0            # p_i is proportional to weight_i ** (1 / temperature_i)

    [[dataset]]                  # ... or prep options (the keys of PrepOptions)
    name = "fineweb"
    source = "hf"
    dataset = "HuggingFaceFW/fineweb-edu"
    weight = 1.0

Relative paths (path, output, input, tokenizer) are relative to the TOML file's directory.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from nmoe.data.errors import DataError
from nmoe.data.loader import _check_tokenizers, mixture_probabilities, read_mixture
from nmoe.data.manifest import Manifest
from nmoe.data.prep import PrepOptions, dataset_dir, prepare
from nmoe.data.shards import atomic_write_text

MIXTURE_KEYS = {"path", "weight", "temperature"}
PREP_KEYS = {f.name for f in fields(PrepOptions)}


def _resolve(base: Path, value) -> str:
    return str(value) if Path(value).is_absolute() else str(base / value)


def entry_options(toml_path: Path, doc: dict, entry: dict) -> PrepOptions | None:
    """PrepOptions of a `[[dataset]]` table that gives prep keys; None when it gives a `path`."""
    unknown = set(entry) - MIXTURE_KEYS - PREP_KEYS
    if unknown:
        raise DataError(f"{toml_path}: unknown [[dataset]] keys {sorted(unknown)}; allowed: "
                        f"{sorted(MIXTURE_KEYS | PREP_KEYS)}")
    if "path" in entry:
        return None
    base = toml_path.parent
    kw = {k: v for k, v in entry.items() if k in PREP_KEYS}
    kw.setdefault("output", doc.get("output", "data"))
    if "tokenizer" not in kw and "tokenizer" in doc:
        kw["tokenizer"] = doc["tokenizer"]
    for key in ("output", "tokenizer") + (("input",) if kw.get("source", "files") == "files" else ()):
        if key in kw:
            kw[key] = _resolve(base, kw[key])
    try:
        return PrepOptions(**kw)
    except TypeError as e:
        raise DataError(f"{toml_path}: [[dataset]] {entry.get('name')!r} is missing keys: {e}") from e


def entry_dir(toml_path: Path, doc: dict, entry: dict) -> Path:
    """Prepared dataset dir of a `[[dataset]]` table."""
    opts = entry_options(Path(toml_path), doc, entry)
    return Path(_resolve(Path(toml_path).parent, entry["path"])) if opts is None else dataset_dir(opts)


def prep_mixture(path: str | Path, progress: bool = True) -> Path:
    """Prepare every dataset of a mixture TOML and write output/name/mixture.json; returns that dir."""
    path = Path(path)
    doc, entries = read_mixture(path)
    datasets = []
    for entry in entries:
        opts = entry_options(path, doc, entry)
        manifest = Manifest.load(entry_dir(path, doc, entry)) if opts is None else prepare(opts, progress)
        datasets.append((manifest, float(entry.get("weight", 1.0)), float(entry.get("temperature", 1.0))))
    _check_tokenizers([m for m, _, _ in datasets], None, None)
    probs = mixture_probabilities([(w, t) for _, w, t in datasets])
    out = Path(_resolve(path.parent, doc.get("output", "data"))) / doc.get("name", path.stem)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "format": "nmoe.data.mixture/1",
        "datasets": [
            {"path": str(Path(m.dir).resolve()), "name": m.name, "weight": w, "temperature": t,
             "probability": float(p), "manifest_sha256": m.sha256, "train_tokens": m.splits["train"].tokens}
            for (m, w, t), p in zip(datasets, probs)
        ],
        "tokenizer": datasets[0][0].tokenizer,
        "vocab_size": datasets[0][0].vocab_size,
    }
    atomic_write_text(out / "mixture.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    if progress:
        for d in record["datasets"]:
            print(f"nmoe-data: mixture {out.name}: {d['name']} p={d['probability']:.3f} "
                  f"({d['train_tokens']:,} train tokens)", flush=True)
    return out
