"""The embedded data: the standard library's source (split by file hash) and scikit-learn's digits."""
import zlib

import pytest
import torch

from mixprec.train import data
from mixprec.train.data import DigitImages, ImageBatches, TextBatches, TextCorpus, is_validation_file


def _fake_stdlib(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\nx = {len(name)}\n")


def test_split_is_by_crc32_of_the_relative_path(tmp_path):
    names = [f"pkg{i % 3}/mod_{i}.py" for i in range(60)]
    _fake_stdlib(tmp_path, names + ["site-packages/third_party.py", "a/dist-packages/x.py"])
    (tmp_path / "notes.txt").write_text("not python")
    corpus = TextCorpus.from_stdlib(tmp_path)
    assert corpus.n_files == 60  # site-packages, dist-packages and non-.py files are not read
    val_names = sorted(n for n in names if zlib.crc32(n.encode()) % 10 == 0)
    assert val_names and len(val_names) < 60
    expected_val = b"".join((tmp_path / n).read_bytes() + b"\0" for n in val_names)
    expected_train = b"".join((tmp_path / n).read_bytes() + b"\0" for n in sorted(names) if n not in val_names)
    assert bytes(corpus.val.tolist()) == expected_val
    assert bytes(corpus.train.tolist()) == expected_train
    assert is_validation_file(val_names[0]) and not is_validation_file(sorted(set(names) - set(val_names))[0])


def test_missing_corpus_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"looked for the directory {tmp_path / 'nowhere'}"):
        TextCorpus.from_stdlib(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No \*\.py files found under .*empty"):
        TextCorpus.from_stdlib(tmp_path / "empty")


def test_the_real_standard_library_corpus():
    corpus = TextCorpus.from_stdlib()
    assert corpus.root == data.stdlib_root()
    assert corpus.n_files > 500                       # CPython ships ~1800 modules and tests
    assert len(corpus.train) > 5_000_000 and len(corpus.val) > 300_000
    assert 0.05 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.2
    text = bytes(corpus.train[:100_000].tolist())
    assert b"def " in text and b"import " in text
    # source code is far from uniform bytes (log 256 = 5.55 nats)
    assert 2.5 < corpus.unigram_entropy() < 4.5


def test_text_batches_are_a_function_of_seed_and_step():
    corpus = TextCorpus.from_stdlib()
    batches = TextBatches(corpus, batch_size=4, seq_len=32, seed=7)
    x, y = batches.train_batch(5)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])           # y is x shifted by one byte
    x_again, _ = TextBatches(corpus, batch_size=4, seq_len=32, seed=7).train_batch(5)
    assert torch.equal(x, x_again)
    assert not torch.equal(x, batches.train_batch(6)[0])
    assert not torch.equal(x, TextBatches(corpus, batch_size=4, seq_len=32, seed=8).train_batch(5)[0])
    val = batches.val_batches(3)
    assert len(val) == 3 and all(v[0].shape == (4, 32) for v in val)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, batches.val_batches(3)))


def test_digit_images():
    images = DigitImages.load()
    assert images.train_x.shape == (1500, 1, 8, 8) and images.val_x.shape == (297, 1, 8, 8)
    assert images.train_x.min() == 0 and images.train_x.max() == 1
    assert set(images.train_y.tolist()) == set(range(10)) == set(images.val_y.tolist())
    batches = ImageBatches(images, batch_size=16, seed=0)
    x, y = batches.train_batch(3)
    assert x.shape == (16, 1, 8, 8) and torch.equal(y, batches.train_batch(3)[1])
    val = batches.val_batches(4)
    assert sum(len(v[1]) for v in val) == 297


def test_too_long_context_is_refused():
    corpus = TextCorpus(torch.zeros(50, dtype=torch.uint8), torch.zeros(20, dtype=torch.uint8), None, 2)
    with pytest.raises(ValueError, match="--seq-len 32 is too long for the corpus: its shortest split has 20 bytes; "
                                         "use --seq-len 18 or less"):
        TextBatches(corpus, batch_size=2, seq_len=32, seed=0)
