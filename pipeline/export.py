"""Export a trained bitwise model for deployment: ``python -m pipeline.export [key=value ...]``.

Keys (``conf/export.yaml``): ``model_file`` (default ``models/bnn.npz``, a file written by
:func:`bnn_core.model_file.save_bitwise_model`), ``format`` (``c``, the only one: a dependency-free C99
library, :mod:`bnn_core.c_export`), ``output`` (the folder to write, default ``dist/c``), ``word_bits``
(32 or 64: the C code's word size), ``overwrite`` (default false: a folder that exists and is not empty is
refused). Relative paths are relative to the working directory.

Output: the folder ``output`` holding ``bnn_model.h``, ``bnn_model.c``, ``main.c`` and ``Makefile``
(``make -C <output>`` builds ``bnn_predict``, which gives exactly :meth:`BitwiseModel.predict` and its
integer scores), and one line on stdout with the flash and RAM bytes. The folder is built in a temporary
sibling and renamed into place only when complete, so a failing or killed export never leaves a partial
folder. With ``overwrite=true`` the old folder is moved aside, the new one renamed in, and the old one
deleted. Nothing else is written: no Hydra ``outputs/`` or ``.hydra/`` folder, no log file. An expected
problem (missing or damaged model file, unsupported format or word size, an existing output folder) ends
the command with one line ``error: export: <message>`` on stderr and exit status 2, having written nothing.

Example::

    python -m pipeline.export model_file=models/bnn.npz output=dist/c word_bits=32
    make -C dist/c && ./dist/c/bnn_predict < images.raw
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bnn_core.c_export import c_memory, c_sources
from bnn_core.errors import BnnError, DataError
from bnn_core.model_file import load_bitwise_model
from pipeline.config import CONF_DIR, ExportConfig, validate_export
from pipeline.files import command_line, fail


def check_output_folder(folder: Path, overwrite: bool, keep: list[Path]) -> None:
    """Refuse an ``output`` that exists but is not a folder, that is a non-empty folder (unless
    ``overwrite``), or that would take ``keep`` (the working directory, the model file) with it."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DataError(f"{folder}: exists and is not a folder")
    resolved = folder.resolve()
    for path in keep:
        if path.resolve() == resolved or resolved in path.resolve().parents:
            raise DataError(f"{folder}: refusing to write over a folder that holds {path}")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise DataError(f"{folder}: folder exists and is not empty (pass overwrite=true to replace it)")


def write_folder(folder: Path, files: dict[str, str]) -> None:
    """Write ``files`` (name -> text) as the folder ``folder``, atomically: into a temporary sibling,
    then renamed. An existing folder (already checked by :func:`check_output_folder`) is replaced."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is an ordinary folder
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if folder.exists():
            # POSIX rename cannot replace a non-empty folder: move the old one aside first, and put it
            # back if the new one cannot take its place.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(config: ExportConfig) -> None:
    folder = Path(config.output)
    model_file = Path(config.model_file)
    # Checked before the model is read, and again (cheaply) by the rename: refusing costs nothing.
    check_output_folder(folder, config.overwrite, keep=[Path.cwd(), model_file])
    if not model_file.is_file():
        raise DataError(
            f"{model_file}: not found; the evaluate stage makes the model file (`python -m pipeline.evaluate` or "
            "`dvc repro`), or pass model_file=<a model file>"
        )
    model = load_bitwise_model(model_file)
    try:
        files = c_sources(model, config.word_bits)
    except ValueError as err:  # an encoder the C code cannot represent
        raise DataError(f"{model_file}: {err}") from None
    memory = c_memory(model, config.word_bits)
    try:
        write_folder(folder, files)
    except OSError as err:
        raise DataError(f"{folder}: cannot write the export ({err.strerror or err})") from None
    print(
        f"export: {config.format} library, {config.word_bits}-bit words -> {folder}: "
        f"flash {memory.flash} bytes (const data), RAM {memory.ram} bytes (static buffers); "
        f"`make -C {folder}` builds bnn_predict"
    )


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        export(validate_export(cfg))
    except BnnError as err:
        fail("export", str(err))


def main() -> None:
    """The command line (exit statuses and signals: :func:`pipeline.files.command_line`)."""
    command_line("export", hydra_main)


if __name__ == "__main__":
    main()
