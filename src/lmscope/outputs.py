"""The rule every command that writes follows: it replaces or deletes only what it made.

Before any work, a command claims its output path here. A folder output may be absent, empty, or
hold an earlier output of the same command (``owned`` recognises it: a store to resume, an export
to overwrite); a file output may be absent or an earlier output. Anything else is refused in one
line, and ``force=True`` (the ``--force`` flag) lets a command that replaces its output replace it.

Example: ``claim_dir(args.out, owned=holds_only(SAE_FILES), force=args.force, command="export")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from lmscope.errors import OutputError

Owned = Callable[[Path], bool]


def _is_url(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _entries(folder: Path) -> list[str]:
    # temp files of an interrupted run of our own writers (".name.tmp-xxxx") do not count
    return sorted(p.name for p in folder.iterdir() if ".tmp-" not in p.name)


def _check_parents(p: Path) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {p}: {parent} is a file, not a folder")
            return


def _refuse(p: Path, held: list[str], command: str, can_force: bool) -> OutputError:
    shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    fix = "choose a new or empty folder" + (", or pass --force to replace it" if can_force else "")
    return OutputError(
        f"{p} already holds files `lmscope {command}` did not write ({shown}); {fix}"
    )


def claim_dir(
    path: str | Path, *, owned: Owned, command: str, force: bool = False, can_force: bool = True
) -> Path:
    """Check that the folder ``path`` may be written by ``command``; return it as a Path.

    ``can_force=False`` is for commands that add to a folder (harvest, train, build) rather than
    replace it: they never take over a folder holding something else.
    """
    p = Path(path)
    if _is_url(path):
        return p  # remote outputs: the writers check their own manifests
    _check_parents(p)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} is a file; {command} writes a folder there: choose a folder path")
    if not p.exists() or (force and can_force):
        return p
    held = _entries(p)
    if held and not owned(p):
        raise _refuse(p, held, command, can_force)
    return p


def claim_file(path: str | Path, *, owned: Owned, command: str, force: bool = False) -> Path:
    """Check that the file ``path`` may be (re)written by ``command``; return it as a Path."""
    p = Path(path)
    _check_parents(p)
    if p.is_dir():
        raise OutputError(f"{p} is a folder; {command} writes a file there: give a file path")
    if p.exists() and not force and not owned(p):
        raise OutputError(
            f"{p} already exists and `lmscope {command}` did not write it; "
            "choose another path, or pass --force to replace it"
        )
    return p


def holds_only(names: Iterable[str]) -> Owned:
    """``owned`` for folders a command fills with known files and nothing else."""
    allowed = frozenset(names)
    return lambda p: all(n in allowed and (p / n).is_file() for n in _entries(p))


def nothing(_: Path) -> bool:
    """``owned`` for outputs no earlier run leaves (always refuse what exists)."""
    return False
