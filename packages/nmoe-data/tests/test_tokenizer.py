import base64

import pytest

from nmoe.data import BOS_TOKEN, DataError, Tokenizer


def test_train_save_load_keeps_identity(tokenizer, tokenizer_path, tmp_path):
    assert tokenizer.vocab_size == 400
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.decode([tokenizer.bos_id]) == BOS_TOKEN
    tokenizer.save(tmp_path / "copy.json")
    again = Tokenizer.load(tmp_path / "copy.json")
    assert again.identity == tokenizer.identity
    assert len(tokenizer.sha256) == 64


def test_training_is_deterministic(docs, tokenizer):
    assert Tokenizer.train(docs, 400).sha256 == tokenizer.sha256
    assert Tokenizer.train(docs, 401).sha256 != tokenizer.sha256


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain words",
        "naïve café 東京 🚀\n\n\ttabs  ",
        "a literal <|bos|> stays text",
        "x" * 3000,
        "\r\n \u00a0 \ufeff",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_encode_batch_matches_encode(tokenizer, docs):
    assert tokenizer.encode_batch(docs[:10]) == [tokenizer.encode(d) for d in docs[:10]]


def test_bpe_compresses(tokenizer, docs):
    text = "".join(docs)
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


def _tiktoken_file(path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"er", b"in"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    return path


def test_tiktoken_file(tmp_path):
    tok = Tokenizer.load(_tiktoken_file(tmp_path / "ranks.tiktoken"))
    assert tok.kind == "tiktoken" and tok.vocab_size == 262 and tok.bos_id == 261
    ids = tok.encode("the other <|bos|> 東京 the")
    assert 257 in ids and 258 in ids and tok.bos_id not in ids
    assert tok.decode(ids) == "the other <|bos|> 東京 the"
    tok.save(tmp_path / "copy.tiktoken")
    assert Tokenizer.load(tmp_path / "copy.tiktoken").sha256 == tok.sha256


def test_errors_name_the_fix(tmp_path, docs):
    with pytest.raises(DataError, match="tokenizer train"):
        Tokenizer.load(tmp_path / "absent.json")
    with pytest.raises(DataError, match="at least 257"):
        Tokenizer.train(docs, 100)
    (tmp_path / "bad.tiktoken").write_text("QQ== 0\n")
    with pytest.raises(DataError, match="single bytes"):
        Tokenizer.load(tmp_path / "bad.tiktoken")


def test_train_from_files(tmp_path, docs, h):
    h.write_jsonl(tmp_path / "a.jsonl", docs[:60])
    h.write_jsonl(tmp_path / "b.jsonl", docs[60:])
    from_glob = Tokenizer.train(str(tmp_path / "*.jsonl"), 400)
    from_paths = Tokenizer.train([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], 400)
    assert from_glob.sha256 == from_paths.sha256 == Tokenizer.train(docs, 400).sha256


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_training_on_no_text_is_refused(texts):
    with pytest.raises(DataError, match="saw no text.*--input"):
        Tokenizer.train(texts, 300)
