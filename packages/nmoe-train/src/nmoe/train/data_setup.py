"""From a config's [data] section to prepared shards: the same code as `nmoe-data prep`."""

from __future__ import annotations

from pathlib import Path

from nmoe.data import (
    PrepOptions,
    SourceUnavailableError,
    dataset_dir,
    is_prepared,
    prep_command,
    prep_option_fields,
    prepare,
)
from nmoe.train.config import Config, DataConfig


class DataNotReady(RuntimeError):
    """The data a config names is missing and cannot be prepared here; the message has the command."""


def prep_options(data: DataConfig) -> PrepOptions:
    """The PrepOptions of a config's [data] section (the same keys)."""
    return PrepOptions(**{f.name: getattr(data, f.name) for f in prep_option_fields()})


def needs_prep(cfg: Config) -> bool:
    """Whether ensure_data(cfg) would prepare data (and so write under data.data_dir)."""
    return not cfg.data.mixture and not is_prepared(prep_options(cfg.data))


def ensure_data(cfg: Config, log=print) -> Path:
    """Path of the prepared dataset (or mixture) for cfg, preparing it first if missing."""
    if cfg.data.mixture:
        mixture = Path(cfg.data.mixture)
        if not mixture.exists():
            raise DataNotReady(
                f"data.mixture = {mixture} does not exist. Write the mixture TOML, then run:\n  uv run nmoe-data prep-mixture --mixture {mixture}"
            )
        return mixture
    opts = prep_options(cfg.data)
    if is_prepared(opts):
        return dataset_dir(opts)
    if cfg.data.tokenizer_vocab_size is None and not Path(cfg.data.tokenizer).is_file():
        raise DataNotReady(
            f"data.tokenizer = {cfg.data.tokenizer!r} does not exist and data.tokenizer_vocab_size is not set, so the data "
            f"'{cfg.data.name}' cannot be prepared. Point data.tokenizer at an existing tokenizer file, or set "
            "data.tokenizer_vocab_size = N to train one from data.input (e.g. --set data.tokenizer_vocab_size=32768)."
        )
    log(
        f"[nmoe] data '{cfg.data.name}' is not prepared under {cfg.data.data_dir}; preparing it now:\n  {prep_command(opts)}"
    )
    try:
        prepare(opts)
    except SourceUnavailableError as e:
        raise DataNotReady(
            f"{e}\nThe data for this config could not be prepared here. Prepare it where the source is reachable, then copy {dataset_dir(opts)} here:\n  {prep_command(opts)}"
        ) from None
    return dataset_dir(opts)
