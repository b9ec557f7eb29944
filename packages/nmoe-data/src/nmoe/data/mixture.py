"""Mixture files: several prepared datasets sampled in fixed proportions.

    name = "web-docs"            # mixture dir = data_dir/name (holds mixture.json after prep-mixture)
    data_dir = "data"            # default root of the datasets below
    tokenizer = "data/tok.json"  # default tokenizer of the datasets below

    [[dataset]]                  # an already prepared dataset ...
    path = "data/docs"
    weight = 3.0
    temperature = 1.0            # p_i is proportional to weight_i ** (1 / temperature_i)

    [[dataset]]                  # ... or prep options (the fields of PrepOptions)
    name = "fineweb"
    source = "hf"
    dataset = "HuggingFaceFW/fineweb-edu"
    weight = 1.0

Relative paths (path, data_dir, input, tokenizer) are relative to the TOML file's directory.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmoe.data.errors import DataError
from nmoe.data.manifest import MANIFEST, Manifest, check_tokenizers
from nmoe.data.prep import PrepOptions, dataset_dir, prep_option_fields, prepare
from nmoe.data.shards import atomic_write_text

MIXTURE_KEYS = {"path", "weight", "temperature"}
PREP_KEYS = {f.name for f in prep_option_fields()}
TOP_LEVEL_KEYS = {"name", "data_dir", "tokenizer", "dataset"}
RENAMED = {"output": "data_dir"}


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a loader: its prepared dir, mixture weight and temperature."""

    path: Path
    weight: float = 1.0
    temperature: float = 1.0


def mixture_probabilities(weights_temperatures: list[tuple[float, float]]) -> np.ndarray:
    """Sampling probability of each source: p_i proportional to weight_i ** (1 / temperature_i)."""
    for w, t in weights_temperatures:
        if not w > 0 or not t > 0:
            raise DataError(f"mixture weight and temperature must be > 0, got weight={w}, temperature={t}")
    raw = np.array([w ** (1.0 / t) for w, t in weights_temperatures], dtype=np.float64)
    return raw / raw.sum()


def _renamed_key_error(path: Path, where: str, keys) -> None:
    for old, new in RENAMED.items():
        if old in keys:
            raise DataError(f"mixture file {path}: {where} key `{old}` is now called `{new}`; rename it")


def read_mixture(path: str | Path) -> tuple[dict, list[dict]]:
    """Parse a mixture TOML: top-level `name`/`data_dir`/`tokenizer` and `[[dataset]]` tables."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read mixture file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"mixture file {path} is not valid TOML: {e}") from e
    _renamed_key_error(path, "top-level", doc)
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise DataError(
            f"mixture file {path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_LEVEL_KEYS)}"
        )
    entries = doc.get("dataset")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"mixture file {path} needs at least one [[dataset]] table")
    for i, entry in enumerate(entries):
        for key in ("weight", "temperature"):
            value = entry.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DataError(
                    f"mixture file {path}: [[dataset]] #{i + 1} has {key} = {value!r}; "
                    f"{key} must be a number > 0 (e.g. {key} = 1.0)"
                )
    return doc, entries


def _resolve(base: Path, value) -> str:
    return str(value) if Path(value).is_absolute() else str(base / value)


def entry_options(toml_path: Path, doc: dict, entry: dict) -> PrepOptions | None:
    """PrepOptions of a `[[dataset]]` table that gives prep keys; None when it gives a `path`."""
    _renamed_key_error(toml_path, "[[dataset]]", entry)
    unknown = set(entry) - MIXTURE_KEYS - PREP_KEYS
    if unknown:
        raise DataError(
            f"{toml_path}: unknown [[dataset]] keys {sorted(unknown)}; allowed: {sorted(MIXTURE_KEYS | PREP_KEYS)}"
        )
    if "path" in entry:
        return None
    base = toml_path.parent
    kw = {k: v for k, v in entry.items() if k in PREP_KEYS}
    kw.setdefault("data_dir", doc.get("data_dir", "data"))
    if "tokenizer" not in kw and "tokenizer" in doc:
        kw["tokenizer"] = doc["tokenizer"]
    for key in ("data_dir", "tokenizer") + (("input",) if kw.get("source", "files") == "files" else ()):
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


def mixture_sources(path: str | Path) -> list[SourceSpec]:
    """SourceSpecs of a mixture TOML file or a `prep-mixture` output dir (mixture.json)."""
    path = Path(path)
    if path.is_dir():
        doc = json.loads((path / "mixture.json").read_text(encoding="utf-8"))
        return [SourceSpec(Path(d["path"]), d["weight"], d["temperature"]) for d in doc["datasets"]]
    doc, entries = read_mixture(path)
    specs = []
    for entry in entries:
        d = entry_dir(path, doc, entry)
        if not (d / MANIFEST).is_file():
            raise DataError(
                f"mixture dataset {d} is not prepared; run `uv run nmoe-data prep-mixture --mixture {path}`"
            )
        specs.append(SourceSpec(d, float(entry.get("weight", 1.0)), float(entry.get("temperature", 1.0))))
    return specs


def prep_mixture(path: str | Path, progress: bool = True) -> Path:
    """Prepare every dataset of a mixture TOML and write data_dir/name/mixture.json; returns that dir."""
    path = Path(path)
    doc, entries = read_mixture(path)
    datasets = []
    for entry in entries:
        opts = entry_options(path, doc, entry)
        manifest = Manifest.load(entry_dir(path, doc, entry)) if opts is None else prepare(opts, progress)
        datasets.append((manifest, float(entry.get("weight", 1.0)), float(entry.get("temperature", 1.0))))
    check_tokenizers([m for m, _, _ in datasets], None, None)
    probs = mixture_probabilities([(w, t) for _, w, t in datasets])
    out = Path(_resolve(path.parent, doc.get("data_dir", "data"))) / doc.get("name", path.stem)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "format": "nmoe.data.mixture/1",
        "datasets": [
            {
                "path": str(Path(m.dir).resolve()),
                "name": m.name,
                "weight": w,
                "temperature": t,
                "probability": float(p),
                "manifest_sha256": m.sha256,
                "train_tokens": m.splits["train"].tokens,
            }
            for (m, w, t), p in zip(datasets, probs)
        ],
        "tokenizer": datasets[0][0].tokenizer,
        "vocab_size": datasets[0][0].vocab_size,
    }
    atomic_write_text(out / "mixture.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    if progress:
        for d in record["datasets"]:
            print(
                f"nmoe-data: mixture {out.name}: {d['name']} p={d['probability']:.3f} "
                f"({d['train_tokens']:,} train tokens)",
                flush=True,
            )
    return out
