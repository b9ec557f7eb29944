import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.data import DataError, ShardCorruptError, TokenizerMismatchError, mixture_probabilities, open_loader

TRAIN, VAL, SHARD = 5003, 1201, 777
OFFSETS = (0, 1_500_000, 2_500_000)  # token values identify the dataset a window came from
SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def root(tmp_path_factory, h):
    root = tmp_path_factory.mktemp("synthetic")
    for i, off in enumerate(OFFSETS):
        h.synthetic_dataset(root / f"ds{i}", TRAIN - 1000 * i, VAL, shard_tokens=SHARD, offset=off)
    return root


def _mixture(root, weights, temperatures=None):
    temperatures = temperatures or [1.0] * len(weights)
    path = root / f"mix_{'_'.join(map(str, weights))}_{'_'.join(map(str, temperatures))}.toml"
    path.write_text(
        "".join(
            f'[[dataset]]\npath = "ds{i}"\nweight = {w}\ntemperature = {t}\n'
            for i, (w, t) in enumerate(zip(weights, temperatures))
        )
    )
    return path


def _loaders(path, world, **kw):
    return [open_loader(path, rank=r, world_size=world, verify=False, **kw) for r in range(world)]


def _check_windows(inputs, targets, seq_len):
    assert inputs.dtype == targets.dtype == np.int64 and inputs.shape == targets.shape
    assert inputs.shape[1] == seq_len
    np.testing.assert_array_equal(targets, inputs + 1)  # synthetic stream is consecutive integers
    np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(seq_len))


@SETTINGS
@given(world=st.integers(1, 4), batch=st.integers(1, 4), seq_len=st.integers(1, 48))
def test_ranks_are_disjoint_and_cover_an_epoch(root, world, batch, seq_len):
    loaders = _loaders(root / "ds0", world, seq_len=seq_len, batch_size=batch)
    n = (TRAIN - 1) // seq_len
    slots = []  # window starts in global slot order: step, then rank, then row
    for _ in range(math.ceil(n / (batch * world))):
        for ld in loaders:
            inputs, targets = ld.next_batch()
            _check_windows(inputs, targets, seq_len)
            slots += inputs[:, 0].tolist()
    assert sorted(slots[:n]) == [j * seq_len for j in range(n)]
    assert loaders[0].tokens_per_batch == batch * seq_len and loaders[0].vocab_size == 1 << 22


def test_each_epoch_is_a_new_permutation(root):
    ld = open_loader(root / "ds0", seq_len=100, batch_size=1, seed=3)
    n = (TRAIN - 1) // 100
    epochs = [[int(ld.next_batch()[0][0, 0]) for _ in range(n)] for _ in range(2)]
    assert ld.epoch == 2
    assert sorted(epochs[0]) == sorted(epochs[1]) == [j * 100 for j in range(n)]
    assert epochs[0] != epochs[1]
    other_seed = open_loader(root / "ds0", seq_len=100, batch_size=1, seed=4)
    assert [int(other_seed.next_batch()[0][0, 0]) for _ in range(n)] != epochs[0]


@SETTINGS
@given(
    world=st.integers(1, 3),
    batch=st.integers(1, 4),
    seq_len=st.integers(1, 64),
    resume=st.integers(0, 40),
    mixture=st.booleans(),
)
def test_resume_gives_the_uninterrupted_batches(root, world, batch, seq_len, resume, mixture):
    path = _mixture(root, [2.0, 1.0, 0.5]) if mixture else root / "ds1"
    kw = dict(seq_len=seq_len, batch_size=batch, seed=7)
    reference = _loaders(path, world, **kw)
    expected = [[ld.next_batch() for _ in range(resume + 5)][resume:] for ld in reference]
    first = _loaders(path, world, **kw)
    for _ in range(resume):
        for ld in first:
            ld.next_batch()
    state = json.loads(json.dumps(first[0].state_dict()))  # rank 0's state resumes every rank
    resumed = _loaders(path, world, **kw)
    for ld, want in zip(resumed, expected):
        ld.load_state_dict(state)
        for got_batch, want_batch in zip([ld.next_batch() for _ in range(5)], want):
            np.testing.assert_array_equal(got_batch[0], want_batch[0])
            np.testing.assert_array_equal(got_batch[1], want_batch[1])


@SETTINGS
@given(
    weights=st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 7.0]), min_size=2, max_size=3),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    world=st.integers(1, 3),
    batch=st.integers(1, 8),
)
def test_mixture_proportions(root, weights, temperature, world, batch):
    path = _mixture(root, weights, [temperature] * len(weights))
    loaders = _loaders(path, world, seq_len=8, batch_size=batch, seed=1)
    counts = np.zeros(len(weights))
    steps = math.ceil(3000 / (batch * world))
    for _ in range(steps):
        for ld in loaders:
            inputs, targets = ld.next_batch()
            _check_windows(inputs, targets, 8)
            counts += np.bincount(np.searchsorted(OFFSETS, inputs[:, 0], side="right") - 1, minlength=len(weights))[
                : len(weights)
            ]
    expected = np.array(weights) ** (1 / temperature)
    expected /= expected.sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.01)
    np.testing.assert_allclose(loaders[0].probabilities, expected)


def test_mixture_probabilities_formula():
    np.testing.assert_allclose(mixture_probabilities([(3, 1), (1, 1)]), [0.75, 0.25])
    np.testing.assert_allclose(mixture_probabilities([(4, 2), (1, 1)]), [2 / 3, 1 / 3])
    with pytest.raises(DataError, match="> 0"):
        mixture_probabilities([(0, 1)])


@pytest.mark.parametrize("line", ['weight = "3"', "temperature = 0", "weight = -1.5", "weight = true"])
def test_mixture_toml_with_a_bad_weight_or_temperature_is_refused(tmp_path, line):
    toml = tmp_path / "mix.toml"
    toml.write_text(f'[[dataset]]\npath = "a"\n[[dataset]]\npath = "b"\n{line}\n')
    with pytest.raises(DataError, match=r"#2 has .* must be a number > 0"):
        open_loader(toml, split="train", seq_len=4, batch_size=1)


@SETTINGS
@given(world=st.integers(1, 4), batch=st.integers(1, 5), seq_len=st.integers(1, 40), mixture=st.booleans())
def test_val_set_is_fixed_finite_and_rank_disjoint(root, world, batch, seq_len, mixture):
    path = _mixture(root, [1.0, 1.0]) if mixture else root / "ds0"
    vals = _loaders(path, world, split="val", seq_len=seq_len, batch_size=batch)
    per_rank = [ld.val_batches() for ld in vals]
    assert len({len(b) for b in per_rank}) == 1
    starts = [int(x) for batches in per_rank for inputs, _ in batches for x in inputs[:, 0]]
    assert len(starts) == len(set(starts))  # no window twice across ranks
    if not mixture:
        assert len(per_rank[0]) == ((VAL - 1) // seq_len) // (batch * world)
        assert all(s >= 1_000_000 for s in starts)  # val tokens, not train
    again = vals[0].val_batches(max_batches=2)
    assert len(again) == min(2, len(per_rank[0]))
    for (a, _), (b, _) in zip(again, per_rank[0]):
        np.testing.assert_array_equal(a, b)
    assert vals[0].state_dict()["step"] == 0


def test_val_errors(root):
    with pytest.raises(DataError, match="too few tokens"):
        open_loader(root / "ds0", split="val", seq_len=5000, batch_size=1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        open_loader(root / "ds0", split="val", seq_len=100, batch_size=20).val_batches()
    with pytest.raises(DataError, match="split='val'"):
        open_loader(root / "ds0", seq_len=10, batch_size=1).val_batches()


@pytest.fixture
def copy(root, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(root / "ds0", dst)
    return dst


def _open(path, **kw):
    kw.setdefault("batch_size", 2)
    return open_loader(path, seq_len=16, **kw)


def test_corrupt_shard_is_named(copy):
    shard = copy / "train_000002.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="train_000002.npy.*sha256.*re-run"):
        _open(copy)
    _open(copy, verify=False)  # size and dtype still fine: only the hash notices


def test_truncated_missing_and_wrong_dtype_shards(copy):
    shard = copy / "train_000001.npy"
    original = shard.read_bytes()
    shard.write_bytes(original[:-8])
    with pytest.raises(ShardCorruptError, match="train_000001.npy"):
        _open(copy, verify=False)
    shard.unlink()
    with pytest.raises(ShardCorruptError, match="train_000001.npy is missing"):
        _open(copy, verify=False)
    np.save(shard, np.frombuffer(original[128:], dtype=np.uint32).astype(np.uint16))
    with pytest.raises(ShardCorruptError, match="uint16.*manifest says uint32"):
        _open(copy, verify=False)


def test_tokenizer_and_vocab_mismatch(root, tmp_path, h):
    with pytest.raises(TokenizerMismatchError, match="tokenizer sha256"):
        _open(root / "ds0", expect_tokenizer_sha256="0" * 64)
    _open(root / "ds0", expect_tokenizer_sha256="f" * 64, expect_vocab_size=1 << 22)
    with pytest.raises(TokenizerMismatchError, match="vocab size"):
        _open(root / "ds0", expect_vocab_size=50_000)
    other = {**h.fake_tokenizer, "sha256": "e" * 64}
    h.synthetic_dataset(tmp_path / "other", 500, 100, shard_tokens=500, tokenizer=other)
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[[dataset]]\npath = "{root / "ds0"}"\n[[dataset]]\npath = "other"\n')
    with pytest.raises(TokenizerMismatchError, match="same --tokenizer"):
        _open(mix)


def test_the_global_position_resumes_under_another_rank_layout(root):
    two = [_open(root / "ds0", world_size=2, rank=r) for r in range(2)]
    for loader in two:
        loader.next_batch(), loader.next_batch(), loader.next_batch()
    state = two[0].state_dict()  # 3 steps x 2 sequences x 2 ranks = 12 sequences handed out
    one = _open(root / "ds0", batch_size=4)
    one.load_state_dict(state)
    first = one.next_batch()[0]
    assert np.array_equal(first, np.concatenate([loader.next_batch()[0] for loader in two]))
    four = [_open(root / "ds0", batch_size=1, world_size=4, rank=r) for r in range(4)]
    for loader in four:
        loader.load_state_dict(state)
    assert np.array_equal(np.concatenate([loader.next_batch()[0] for loader in four]), first)
    with pytest.raises(DataError, match="stopped after 12 sequences over all ranks, not a multiple of this loader's 8"):
        _open(root / "ds0", batch_size=8).load_state_dict(state)


def test_state_mismatch_and_bad_paths(root, tmp_path):
    state = _open(root / "ds0").state_dict()
    with pytest.raises(DataError, match="seq_len"):
        open_loader(root / "ds0", seq_len=8, batch_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="nmoe-data prep"):
        _open(tmp_path)
    (tmp_path / "m.toml").write_text('[[dataset]]\npath = "missing"\n')
    with pytest.raises(DataError, match="prep-mixture"):
        _open(tmp_path / "m.toml")
    with pytest.raises(DataError, match="rank"):
        _open(root / "ds0", rank=2, world_size=2)
