import json

import numpy as np
import pytest

from nmoe.data import DataError, Tokenizer, open_loader, prep_mixture
from nmoe.data.cli import main


@pytest.fixture
def corpus(tmp_path, docs, h):
    (tmp_path / "in").mkdir()
    h.write_jsonl(tmp_path / "in" / "a.jsonl.gz", docs, gz=True)
    return str(tmp_path / "in" / "*.jsonl.gz")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("prep", "tokenizer", "prep-mixture", "inspect"):
        assert cmd in out


def test_tokenizer_prep_inspect(tmp_path, corpus, capsys):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", str(tok)]) == 0
    assert Tokenizer.load(tok).vocab_size == 300
    args = [
        "prep",
        "--input",
        corpus,
        "--output",
        str(tmp_path / "data"),
        "--name",
        "d",
        "--tokenizer",
        str(tok),
        "--shard-tokens",
        "1000",
        "--val-fraction",
        "0.1",
        "--workers",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train" in out and "tok/s" in out
    assert main(args + ["--no-progress"]) == 0  # finished: a no-op
    assert main(["inspect", str(tmp_path / "data" / "d"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "vocab 300" in out and "OK" in out
    assert main(["inspect", str(tmp_path / "data" / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    rc = main(
        [
            "prep",
            "--input",
            str(tmp_path / "none*.txt"),
            "--output",
            str(tmp_path),
            "--name",
            "x",
            "--tokenizer",
            str(tmp_path / "t.json"),
            "--tokenizer-vocab-size",
            "300",
        ]
    )
    assert rc == 2 and "no files match" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2


def test_prep_mixture(tmp_path, corpus, tokenizer_path, capsys):
    assert (
        main(
            [
                "prep",
                "--input",
                corpus,
                "--output",
                str(tmp_path / "data"),
                "--name",
                "a",
                "--tokenizer",
                str(tokenizer_path),
                "--val-fraction",
                "0.2",
                "--no-progress",
            ]
        )
        == 0
    )
    mix = tmp_path / "mix.toml"
    mix.write_text(
        f'name = "mix"\ndata_dir = "data"\ntokenizer = "{tokenizer_path}"\n'
        '[[dataset]]\npath = "data/a"\nweight = 3\n'
        f'[[dataset]]\nname = "b"\ninput = "{corpus}"\nmax_docs = 60\nval_fraction = 0.2\n'
        "weight = 1\ntemperature = 1.0\n"
    )
    assert main(["prep-mixture", "--mixture", str(mix)]) == 0
    record = json.loads((tmp_path / "data" / "mix" / "mixture.json").read_text())
    assert [d["name"] for d in record["datasets"]] == ["a", "b"]
    assert [d["probability"] for d in record["datasets"]] == [0.75, 0.25]
    assert main(["inspect", str(tmp_path / "data" / "mix")]) == 0
    assert "p=0.750" in capsys.readouterr().out
    for path in (mix, tmp_path / "data" / "mix"):
        ld = open_loader(path, seq_len=16, batch_size=4)
        inputs, targets = ld.next_batch()
        assert inputs.shape == (4, 16) and np.array_equal(inputs[:, 1:], targets[:, :-1])


def test_prep_of_an_empty_input_exits_2_naming_it(tmp_path, tokenizer_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "data"
    rc = main(
        [
            "prep",
            "--input",
            str(tmp_path / "empty.jsonl"),
            "--output",
            str(out),
            "--name",
            "e",
            "--tokenizer",
            str(tokenizer_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"input '{tmp_path / 'empty.jsonl'}' has no documents" in err
    assert not (out / "e" / "manifest.json").exists()
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(tmp_path / "empty.jsonl"),
            "--vocab-size",
            "300",
            "--output",
            str(tmp_path / "tok.json"),
        ]
    )
    assert rc == 2 and "saw no text" in capsys.readouterr().err and not (tmp_path / "tok.json").exists()


def test_mixture_keys_are_checked(tmp_path, corpus, tokenizer_path):
    mix = tmp_path / "mix.toml"
    mix.write_text(f'output = "data"\ntokenizer = "{tokenizer_path}"\n[[dataset]]\nname = "b"\ninput = "{corpus}"\n')
    assert main(["prep-mixture", "--mixture", str(mix)]) == 2
    mix.write_text(f'tokenizer = "{tokenizer_path}"\n[[dataset]]\nname = "b"\noutput = "x"\ninput = "{corpus}"\n')
    with pytest.raises(DataError, match="`output` is now called `data_dir`"):
        prep_mixture(mix, progress=False)
    mix.write_text(f'tokenizr = "{tokenizer_path}"\n[[dataset]]\nname = "b"\ninput = "{corpus}"\n')
    with pytest.raises(DataError, match=r"unknown top-level keys \['tokenizr'\]"):
        prep_mixture(mix, progress=False)
