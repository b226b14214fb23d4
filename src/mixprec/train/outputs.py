"""Output directories of `mixprec train` and `compare`: usable, and never another run's, unless asked.

A directory "holds a run" when it (or a sub-directory of compare's, one per recipe or seed) contains
a file either command writes. Such a directory is refused unless the run resumes it or is told to
overwrite it; overwriting first removes those files (and only those), so no stale checkpoint or curve of
the old run can be mistaken for the new one's.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# what train (checkpoints, metrics, config) and compare (tables, curves, per-recipe errors) write
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.dcp", "checkpoint.prev.dcp", "metrics.jsonl",
             "config.json", "tensorboard", "error.txt", "curves.png",
             "table.md", "table.csv", "curves.json", "loss_curves.png", "seeds.md", "seeds.json", "batch_sizes.md",
             "batch_sizes.json")
_DEPTH = 3   # compare --seeds writes OUT/seed-<s>/<recipe>/metrics.jsonl, --batch-sizes OUT/bs-<b>/<recipe@b>/


def check_writable(out: Path | str, flag: str = "--out") -> None:
    """Raise ValueError (one line) when `out` cannot be a directory this process writes into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a directory; give a directory path")
    existing = next(p for p in (out, *out.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        raise ValueError(f"{flag} {out} lies below {existing}, which is a file, not a directory; give a "
                         f"directory path")
    try:   # a real probe: permissions, read-only file systems and the superuser are all answered by trying
        os.rmdir(tempfile.mkdtemp(prefix=".mixprec-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"{flag} {out} cannot be written: creating a directory in {existing} fails "
                         f"({e.strerror}); give a directory you can write to") from None


def run_files(out: Path | str) -> list[Path]:
    """The files (and tensorboard directories) of earlier runs in `out` and its sub-directories."""
    out, found = Path(out), []
    if not out.is_dir():
        return found

    def walk(directory: Path, depth: int) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name in RUN_FILES:
                found.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and depth < _DEPTH:
                walk(entry, depth + 1)

    walk(out, 1)
    return found


def refuse_existing_run(out: Path | str, *, resumable: bool) -> None:
    """Raise ValueError naming `out` and the ways out when it holds an earlier run."""
    found = run_files(out)
    if not found:
        return
    names = ", ".join(str(p.relative_to(out)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
    ways = (f"continue it with --resume {out}, " if resumable else "") + "replace it with --overwrite"
    raise ValueError(f"--out {out} already holds a run ({names}); {ways}, or give another --out")


def clear_run(out: Path | str) -> None:
    """Remove what earlier runs wrote into `out` (run_files), then the sub-directories that held them
    and are left empty."""
    out = Path(out)
    emptied = set()
    for path in run_files(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        emptied.update(p for p in path.parents if p != out and out in p.parents)
    for directory in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # the deepest first
        if not any(directory.iterdir()):
            directory.rmdir()


# ---- diagnose ------------------------------------------------------------------------------------
# what `mixprec diagnose` writes (DiagnosisReport.save): the table, JSON, the page and its figures, the policy
DIAGNOSIS_FILES = ("report.txt", "report.json", "report.html", "recommended_policy.json", "hist_*.png", "ranges_*.png")


def refuse_nonempty(out: Path | str) -> None:
    """Raise ValueError naming `out` and the ways out when it holds anything: a diagnosis is read as a
    whole (a page, its figures, a policy), so it is not written among other files unless asked."""
    out = Path(out)
    found = sorted(out.iterdir()) if out.is_dir() else []
    if not found:
        return
    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    raise ValueError(f"--out {out} already holds files ({names}); replace the diagnosis there with --overwrite, "
                     f"or give another --out")


def clear_diagnosis(out: Path | str) -> None:
    """Remove what an earlier diagnosis wrote into `out` (DIAGNOSIS_FILES), so no stale figure or policy
    stays beside the new report; other files are left as they are."""
    out = Path(out)
    for pattern in DIAGNOSIS_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
