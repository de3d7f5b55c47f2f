"""SDF files: atomic writes of generated molecules, reads that keep explicit hydrogens."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from rdkit import Chem

INDEX_PROP = "fastflow_index"
# SDWriter numbers each property header by the record's position in its file: ">  <name>  (k) ".
_PROPERTY_HEADER = re.compile(rb"^(>  <[^\n]*>  \()(\d+)(\) ?)$", re.MULTILINE)
_RECORD_END = re.compile(rb"^\$\$\$\$\r?$", re.MULTILINE)


def write_sdf(
    path: str | os.PathLike,
    mols: Sequence[Chem.Mol | None],
    props: Sequence[Mapping[str, object]] | None = None,
) -> int:
    """Write molecules (conformer 0 each) to ``path``; returns the number of records written.

    ``None`` entries (molecules that failed to build) are skipped; every record carries its position in
    ``mols`` as the ``fastflow_index`` property so records can be matched back. ``props[i]`` holds extra
    properties for ``mols[i]``. The file is written next to ``path`` under a temporary name and renamed
    into place, so ``path`` is never left half-written.
    """
    if props is not None and len(props) != len(mols):
        raise ValueError(f"props must have one entry per molecule: {len(props)} props for {len(mols)} mols")
    path = Path(path)
    # Not mkstemp: its 0600 mode would survive the rename; SDWriter creates the file with the umask.
    tmp_name = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
    n_written = 0
    try:
        writer = Chem.SDWriter(tmp_name)
        try:
            for idx, mol in enumerate(mols):
                if mol is None:
                    continue
                if not isinstance(mol, Chem.Mol):
                    raise TypeError(f"mols[{idx}] must be an RDKit Mol or None, got {type(mol).__name__}")
                record = Chem.Mol(mol)  # leave the caller's molecule untouched
                record.SetIntProp(INDEX_PROP, idx)
                for key, value in (props[idx] if props is not None else {}).items():
                    record.SetProp(key, str(value))
                writer.write(record)
                n_written += 1
        finally:
            writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return n_written


def read_sdf(path: str | os.PathLike, sanitize: bool = True) -> list[Chem.Mol | None]:
    """All records of an SDF file, hydrogens kept; a record RDKit cannot parse comes back as None."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no SDF file at {path}")
    if Path(path).stat().st_size == 0:  # a run where no molecule could be built; RDKit refuses empty files
        return []
    return list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=sanitize))


def concatenate_sdf(sources: Sequence[str | os.PathLike], path: str | os.PathLike) -> int:
    """Write the records of ``sources``, in order, to ``path`` (atomically, as :func:`write_sdf`); returns the
    number of records. Property headers are renumbered to the records' positions in the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    n_written = 0
    try:
        with open(tmp, "wb") as out:
            for source in sources:
                text = Path(source).read_bytes()
                out.write(_PROPERTY_HEADER.sub(partial(_renumber, offset=n_written), text))
                n_written += len(_RECORD_END.findall(text))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n_written


def _renumber(match: re.Match, offset: int) -> bytes:
    return match.group(1) + str(int(match.group(2)) + offset).encode() + match.group(3)
