"""Real data that ships with the machine: nothing is downloaded, nothing is random noise.

Text: the Python standard library's own source, found at run time with `sysconfig`. Every `*.py` file
under `sysconfig.get_paths()["stdlib"]` (third-party `site-packages`/`dist-packages` excluded, so the
corpus depends on the Python version alone), read as bytes, in sorted order of the relative paths.
Split, fixed and documented: a file is validation when `zlib.crc32(relative_path) % 10 == 0` (about
10 % of files, stable when other files are added or removed); the rest is training text. Files are
concatenated, each followed by a NUL byte (0 never occurs in source code, so it marks file ends).

Images: the UCI optical-recognition handwritten digits (1797 8x8 grey images, 10 classes) that
scikit-learn ships inside its wheel (`sklearn.datasets.load_digits`, no download). Split, fixed: the
first 1500 images train, the last 297 validate.

Batches are a pure function of (seed, step): resuming at step s draws exactly the batches an
uninterrupted run would, so the data position is the step counter.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_MODULUS = 10            # 1 file in 10 (by path hash) is validation
FILE_SEPARATOR = b"\0"
DIGITS_TRAIN = 1500         # of 1797: ~83 % train, 297 images left to validate on


def stdlib_root() -> Path:
    """Where this Python's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation_file(relative_path: str) -> bool:
    """The fixed split: crc32 of the POSIX relative path, modulo 10, equals 0."""
    return zlib.crc32(relative_path.encode()) % VAL_MODULUS == 0


_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # third-party code and bytecode


def _python_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every *.py file under root, sorted; skipped dirs are not walked."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(directory, name)
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


@dataclass
class TextCorpus:
    """Byte-level train and validation text, as uint8 tensors."""

    train: torch.Tensor
    val: torch.Tensor
    root: Path
    n_files: int

    @classmethod
    def from_stdlib(cls, root: Path | str | None = None) -> "TextCorpus":
        """Read every *.py file under the standard library (or `root`), split by file.

        Kept in memory for the life of the process (compare reads it once for all recipes);
        nothing is cached on disk.
        """
        return _read_corpus(cls, Path(root) if root is not None else stdlib_root())

    @classmethod
    def _read(cls, root: Path) -> "TextCorpus":
        if not root.is_dir():
            raise FileNotFoundError(f"Python standard library source not found: looked for the directory "
                                    f"{root} (sysconfig.get_paths()['stdlib']); mixprec's text corpus is "
                                    f"this Python's own *.py files")
        files = _python_files(root)
        if not files:
            raise FileNotFoundError(f"No *.py files found under {root} (sysconfig.get_paths()['stdlib']); "
                                    f"mixprec's text corpus is this Python's standard library source")
        parts: dict[bool, list[bytes]] = {True: [], False: []}
        for rel, path in files:
            parts[is_validation_file(rel)].append(path.read_bytes() + FILE_SEPARATOR)
        train, val = (np.frombuffer(b"".join(parts[v]), dtype=np.uint8) for v in (False, True))
        if len(val) == 0 or len(train) == 0:
            raise FileNotFoundError(f"Too few *.py files under {root} to split into train and validation "
                                    f"({len(files)} found)")
        return cls(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()), root, len(files))

    def unigram_entropy(self) -> float:
        """Entropy (nats/byte) of the training bytes' frequencies: the loss of the best context-free model."""
        counts = torch.bincount(self.train.long(), minlength=256).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


@functools.lru_cache(maxsize=2)
def _read_corpus(cls: type, root: Path) -> TextCorpus:
    return cls._read(root)


@dataclass
class TextBatches:
    """Windows of `seq_len + 1` bytes: x = bytes[i:i+T], y = bytes[i+1:i+T+1]."""

    corpus: TextCorpus
    batch_size: int
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        shortest = min(len(self.corpus.train), len(self.corpus.val))
        if shortest <= self.seq_len + 1:
            raise ValueError(f"--seq-len {self.seq_len} is too long for the corpus: its shortest split has "
                             f"{shortest:,} bytes; use --seq-len {shortest - 2} or less")

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step`: random windows drawn from a generator seeded by (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.corpus.train) - self.seq_len - 1, size=self.batch_size)
        return self._windows(self.corpus.train, starts)

    def val_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n_batches` fixed batches of windows spread evenly over the validation text (no randomness)."""
        starts = np.linspace(0, len(self.corpus.val) - self.seq_len - 2, n_batches * self.batch_size).astype(np.int64)
        return [self._windows(self.corpus.val, s) for s in starts.reshape(n_batches, self.batch_size)]

    def _windows(self, data: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


@dataclass
class DigitImages:
    """The UCI handwritten digits, as float images in [0, 1] of shape (N, 1, 8, 8) and int labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @classmethod
    def load(cls) -> "DigitImages":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise FileNotFoundError("The CNN's images are the UCI handwritten digits inside scikit-learn's "
                                    "wheel (sklearn.datasets.load_digits); install it: pip install "
                                    "'mixprec[data]'") from e
        digits = load_digits()
        # pixel values are counts 0..16 (of a 4x4 block of the 32x32 scan): scale to [0, 1]
        x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        y = torch.from_numpy(digits.target.astype(np.int64))
        return cls(x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])


@dataclass
class ImageBatches:
    images: DigitImages
    batch_size: int
    seed: int

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step`: images drawn (with replacement) by a generator seeded by (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        idx = torch.from_numpy(rng.integers(0, len(self.images.train_y), size=self.batch_size))
        return self.images.train_x[idx], self.images.train_y[idx]

    def val_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole validation set in order, in at most `n_batches` batches."""
        n = len(self.images.val_y)
        size = max(self.batch_size, -(-n // n_batches))
        return [(self.images.val_x[i:i + size], self.images.val_y[i:i + size]) for i in range(0, n, size)]


Batches = TextBatches | ImageBatches


def batches_for(model: str, *, batch_size: int, seq_len: int, seed: int, corpus_root: Path | str | None = None) -> Batches:
    """The data the model trains on: byte text for gpt/lstm/gru, digit images for the cnn."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if model == "cnn":
        return ImageBatches(DigitImages.load(), batch_size, seed)
    return TextBatches(TextCorpus.from_stdlib(corpus_root), batch_size, seq_len, seed)
