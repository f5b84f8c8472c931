"""The model file: one uncompressed ``.npz`` file holding a :class:`~bnn_core.bitwise_model.BitwiseModel`.

:func:`save_bitwise_model` writes a model (``models/bnn.npz``), :func:`load_bitwise_model` reads it back and
refuses, with a :class:`~bnn_core.errors.ModelFileError` whose message starts with the path, anything that
is not exactly such a file. The model itself (encoder + packed network, ``predict``) is
:mod:`bnn_core.bitwise_model`.

File format, version 2
----------------------

An ``.npz`` archive: a zip of ``.npy`` members (written by ``numpy.lib.format.write_array``), stored
uncompressed (``ZIP_STORED``) with a fixed timestamp (1980-01-01) in a fixed order, so the same model
always gives the same bytes (``numpy.savez`` would stamp the current time). It is read with
``numpy.load(path, allow_pickle=False)`` only; pickled data is never loaded. Every member is a
one-dimensional array:

=================  ================  =====================================================================
member             dtype             content
=================  ================  =====================================================================
``header``         ``uint8 [h]``     UTF-8 JSON object (canonical: sorted keys, no spaces, ASCII)
``signs_<i>``      ``<u8 [s]``       layer ``i``'s signs: ``s = ceil(n_out * n_in / 64)`` words, or, when
                                    the layer has a mask, the signs of its nonzero weights only
                                    (``s = ceil(popcount(mask) / 64)``)
``mask_<i>``       ``<u8 [w]``       layer ``i``'s nonzero mask, ``w = ceil(n_out * n_in / 64)`` words;
                                    only when the layer has zero weights
``biases``         ``<u8 [b]``       the layers' constants as ``bias_bits``-bit fields, input layer first,
                                    ``b = ceil(sum n_out * bias_bits / 64)`` (0 words when every layer's
                                    ``bias_bits`` is 0)
=================  ================  =====================================================================

Bit planes are bit-contiguous, *not* padded per row: the ``[n_out, n_in]`` matrix is flattened row
major and its element ``k = r * n_in + c`` is bit ``k % 64`` of word ``k // 64`` (little-endian
uint64, the packed engine's order). Bit 1 means +1 in a sign plane, nonzero in a mask; unused bits of
the last word are 0. A layer with no ``mask_<i>`` member has no zero weights and one sign bit per weight.
A layer with a mask stores sign bits for its nonzero weights only, in the row-major order of their
positions: a zero weight has no sign, so it costs 1 bit and a nonzero weight 2 (at sparsity ``s`` that
is ``2 - s`` bits per weight rather than 2). The loader scatters the signs back and re-pads rows into
the engine's ``uint64 [n_out, ceil(n_in / 64)]`` words.

Layer constants. Every layer computes ``a = W z + c`` with one integer ``c`` per unit, ``|c| <= n_in + 1``
(:func:`bnn_core.packed.bias_bound`): the paper's bias in {-1, +1}, or ``-threshold`` of a network whose
batch norm was folded into thresholds. Layer ``i`` stores its ``n_out`` constants as ``c = bias_min +
bias_step * u`` with ``u`` unsigned ``bias_bits``-bit fields, in the one canonical form of
:func:`bnn_core.packed.bias_code`:

- ``bias_min = min(c)``; ``bias_step = gcd(c - bias_min)``, or 1 when all ``c`` are equal;
- ``bias_bits = bit_length(max(u))``: 0 when all ``c`` are equal (nothing stored), 1 for the paper's
  {-1, +1} (``bias_min = -1, bias_step = 2``: the field is 1 for +1, the bit version 1 stored), ``k`` for
  constants spanning up to ``2^k - 1`` steps (at most ``bit_length(2 n_in + 2)`` bits).

Fields are bit-contiguous little-endian, like the planes: layer ``i``'s field ``j`` starts at bit
``B_i + j * bias_bits_i`` of the ``biases`` bit stream, ``B_i = sum_{l < i} n_out_l * bias_bits_l``, and its
bit ``t`` (value ``2^t``) is stream bit ``B_i + j * bias_bits_i + t``. So a paper network's ``biases``
member is bit for bit its version-1 member (unless a layer's biases are all equal, which then costs 0 bits).
The reader refuses anything but the canonical form (``u`` not starting at 0, a step that is not the
fields' gcd, more bits than the largest field needs) and constants beyond ``n_in + 1``: one model has
exactly one file.

On disk a model therefore takes the bits the cost report (:mod:`bnn_core.cost`, given the biases) counts
-- a sign bit per nonzero weight, a mask bit per weight for layers with zeros, ``bias_bits`` per unit --
plus a fixed overhead: ``204 + 2 * len(member name)`` bytes per member (zip local header 30, zip central
directory 46, ``.npy`` header 128), 22 bytes of zip trailer, the JSON header and at most 63 bits of word
padding per member. For the paper's 784-1024-1024-1024-10 network that overhead is about 2.9 KB with
masks and 2.0 KB without, before metadata (``tests/test_model_file.py`` checks it stays within 4 KiB).
The header grows with ``metadata`` and with a ``lloyd_max`` encoder's levels (about 19 bytes each: 300
bytes at 4 bits, 5 KB at 8 bits, which then exceeds that bound).

Header fields (all required, no others):

- ``format``: ``"bitwise-nn-model"``; ``format_version``: ``2`` (``1`` is read too, see below; other
  versions are refused);
- ``n_pixels``: raw pixels per image; ``encoder``: the input binarizer's ``to_dict()`` (a binary one:
  ``threshold`` or ``lloyd_max``), which turns ``n_pixels`` pixels into layer 0's ``n_in`` bits;
- ``layers``: ``[{"n_in": int, "n_out": int, "mask": bool, "bias_min": int, "bias_step": int,
  "bias_bits": int}, ...]``, input layer first; each layer's ``n_out`` is the next one's ``n_in``; the
  last ``n_out`` is the number of classes; ``1 <= n_in <= 2^30 - 1``;
- ``sign_of_zero``: ``1`` (hidden units output ``a >= 0``, :data:`bnn_core.quantizers.SIGN_OF_ZERO`);
  ``argmax_ties``: ``"lowest_index"`` (the predicted class is the first maximum of the last layer);
- ``metadata``: free JSON object (training config, accuracy, ...);
- ``sha256``: hex digest (:func:`content_hash`) of ``b"bitwise-nn-model content\\n"`` followed by, each
  framed by its length as 8 little-endian bytes: the canonical JSON of the header without ``sha256``,
  then for every other member in name order its name, ``dtype.str``, JSON shape and raw bytes.

Members are written in the order ``header``, then per layer ``signs_<i>`` and ``mask_<i>``, then
``biases``; the reader does not depend on the order.

Version history
---------------

- 1: the paper's network only. Layer entries are ``{"n_in", "n_out", "mask"}`` and ``biases`` holds one
  bit per unit, ``b = ceil(sum n_out / 64)`` words: bit 1 is ``c = +1``, bit 0 is ``c = -1``. Everything
  else is as in version 2. Still read; :func:`encode_model` writes it on request (``format_version=1``)
  for a model whose constants are all -1 or +1.
- 2 (written by default): integer constants per layer (``bias_min``, ``bias_step``, ``bias_bits``), for
  networks with batch norm folded into thresholds. A paper network costs the bits it did in version 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from bnn_core.bitwise_model import BinaryEncoder, BitwiseModel, layer_problem
from bnn_core.errors import ConfigError, ModelFileError
from bnn_core.input_encoders import LloydMaxEncoder, encoder_from_dict
from bnn_core.packed import (
    MAX_N_IN,
    PackedLayer,
    PackedNetwork,
    bias_bound,
    bias_code,
    n_words,
    pack_bits,
    unpack_bits,
)

FORMAT_NAME = "bitwise-nn-model"
#: The version :func:`save_bitwise_model` writes.
FORMAT_VERSION = 2
#: The versions :func:`load_bitwise_model` reads.
READ_VERSIONS = (1, 2)
ARGMAX_TIES = "lowest_index"
#: sign(0) = +1: the rule of :func:`bnn_core.packed.sign_bits` and :data:`bnn_core.quantizers.SIGN_OF_ZERO`,
#: restated here so reading a model file does not import torch (a test checks the two agree).
SIGN_OF_ZERO = 1
WORD_DTYPE = np.dtype("<u8")
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
HEADER_KEYS = frozenset(
    {"format", "format_version", "n_pixels", "encoder", "layers", "sign_of_zero", "argmax_ties", "metadata", "sha256"}
)
#: The keys of a header layer entry, per format version.
LAYER_KEYS = {
    1: frozenset({"n_in", "n_out", "mask"}),
    2: frozenset({"n_in", "n_out", "mask", "bias_min", "bias_step", "bias_bits"}),
}
#: Largest header accepted (bytes); a real one is well under 1 KB plus metadata.
MAX_HEADER_BYTES = 1 << 20

#: What numpy / zipfile / json raise on a damaged or foreign file. Only ModelFileError leaves the loader.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    MemoryError,
    OverflowError,
    SyntaxError,
)


def canonical_json(obj: Any) -> bytes:
    """The one byte string a JSON value is stored and hashed as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def content_hash(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the header without its ``sha256`` field and the arrays (all members but ``header``)."""
    digest = hashlib.sha256(b"bitwise-nn-model content\n")

    def frame(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    frame(canonical_json({k: v for k, v in header.items() if k != "sha256"}))
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        frame(name.encode("utf-8"))
        frame(array.dtype.str.encode("ascii"))
        frame(canonical_json(list(array.shape)))
        frame(array.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def _plane_words(bits: np.ndarray) -> np.ndarray:
    """Bit-contiguous words of a boolean matrix, flattened row major (no per-row padding)."""
    return pack_bits(np.asarray(bits, dtype=bool).ravel()).astype(WORD_DTYPE)


def field_bits(fields: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers ``[n]`` -> booleans ``[n * bits]``: field ``j``'s bit ``t`` (value ``2^t``) at
    ``j * bits + t`` (little-endian, bit-contiguous, like the planes)."""
    fields = np.asarray(fields, dtype=np.int64)
    return ((fields[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(bool).ravel()


def bits_field(bits: np.ndarray, bits_per_field: int) -> np.ndarray:
    """Inverse of :func:`field_bits`: booleans ``[n * bits_per_field]`` -> ``int64 [n]`` (fields < 2^62)."""
    weights = np.left_shift(np.int64(1), np.arange(bits_per_field, dtype=np.int64))
    return np.asarray(bits, dtype=bool).reshape(-1, bits_per_field).astype(np.int64) @ weights


def encode_model(model: BitwiseModel, format_version: int = FORMAT_VERSION) -> dict[str, np.ndarray]:
    """The members of a model file, ``header`` included (its ``sha256`` filled in).

    ``format_version`` 2 (default) stores any integer constants; 1 only the paper's -1 / +1 (ValueError
    otherwise), for a reader that predates version 2.
    """
    if format_version not in READ_VERSIONS:
        raise ValueError(f"cannot write format version {format_version!r} (versions: {list(READ_VERSIONS)})")
    arrays: dict[str, np.ndarray] = {}
    layer_specs = []
    bias_fields = []
    for i, layer in enumerate(model.network.layers):
        mask = unpack_bits(layer.mask, layer.n_in)
        signs = unpack_bits(layer.signs, layer.n_in) & mask
        has_zeros = not bool(mask.all())
        # A zero weight needs no sign: store the signs of the nonzero weights only.
        arrays[f"signs_{i}"] = _plane_words(signs[mask] if has_zeros else signs)
        if has_zeros:
            arrays[f"mask_{i}"] = _plane_words(mask)
        spec: dict[str, Any] = {"n_in": layer.n_in, "n_out": layer.n_out, "mask": has_zeros}
        if format_version == 1:
            if not np.isin(layer.bias, (-1, 1)).all():
                raise ValueError(f"layer {i}: format version 1 stores biases -1 / +1 only; use version 2")
            bias_fields.append(layer.bias > 0)
        else:
            code, fields = bias_code(layer.bias)
            spec.update(bias_min=code.low, bias_step=code.step, bias_bits=code.bits)
            bias_fields.append(field_bits(fields, code.bits))
        layer_specs.append(spec)
    arrays["biases"] = _plane_words(np.concatenate(bias_fields))
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "n_pixels": model.n_pixels,
        "encoder": model.encoder.to_dict(),
        "layers": layer_specs,
        "sign_of_zero": SIGN_OF_ZERO,
        "argmax_ties": ARGMAX_TIES,
        "metadata": model.metadata,
    }
    header["sha256"] = content_hash(header, arrays)
    return {"header": np.frombuffer(canonical_json(header), dtype=np.uint8), **arrays}


def write_npz(handle: IO[bytes], members: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, minus the clock: ``<name>.npy`` members, uncompressed, fixed timestamp."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIMESTAMP)
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_STORED)


def save_bitwise_model(path: str | Path, model: BitwiseModel, format_version: int = FORMAT_VERSION) -> int:
    """Write ``model`` to ``path`` atomically (temporary file beside it, then rename); returns the bytes written.

    ``format_version``: see :func:`encode_model` (2 unless a version-1 reader must read the file)."""
    path = Path(path)
    members = encode_model(model, format_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_npz(handle, members)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 -> what open() would have created
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------- reading


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_members(path: Path) -> dict[str, Any]:
    """Every member of the archive as numpy gives it (arrays; raw bytes for a non-.npy member)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        # numpy's message for a pickle suggests loading it unsafely: not advice a model loader should pass on.
        reason = "not a zip archive; pickled data is never loaded" if "pickle" in str(err) else _describe(err)
        raise ModelFileError(f"{path}: not a readable .npz archive ({reason})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ModelFileError(f"{path}: a single .npy array, not an .npz model archive")
    size = path.stat().st_size
    with loaded as npz:
        try:
            infos = npz.zip.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise ModelFileError(f"{path}: the archive holds duplicate members")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ModelFileError(f"{path}: unexpected member {info.filename!r} (not an .npy array)")
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    raise ModelFileError(
                        f"{path}: member {info.filename!r} is compressed or encrypted; "
                        "the format stores members uncompressed"
                    )
                if info.file_size > size:
                    raise ModelFileError(
                        f"{path}: member {info.filename!r} claims {info.file_size} bytes, more than the file"
                    )
                _check_npy_header(path, npz.zip, info)
            return {name: npz[name] for name in npz.files}
        except ModelFileError:
            raise
        except _READ_ERRORS as err:
            raise ModelFileError(f"{path}: damaged archive ({_describe(err)})") from None


def _check_npy_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose ``.npy`` header asks for objects or for more data than the member holds,
    before numpy allocates anything for it."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ModelFileError(f"{path}: member {info.filename!r} has unsupported .npy version {version}")
    if dtype.hasobject:
        raise ModelFileError(f"{path}: member {info.filename!r} holds Python objects; pickled data is never loaded")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise ModelFileError(f"{path}: member {info.filename!r} declares shape {shape}, more data than it holds")


def _finite_float(text: str) -> float:
    """JSON number -> float, refusing what overflows to infinity (``1e999``) and the NaN/Infinity constants."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


def _parse_header(path: Path, raw: Any) -> dict[str, Any]:
    if raw is None:
        raise ModelFileError(f"{path}: missing member 'header'")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
        raise ModelFileError(f"{path}: dtype mismatch: member 'header' must be uint8 [h] JSON bytes")
    if raw.size > MAX_HEADER_BYTES:
        raise ModelFileError(f"{path}: header of {raw.size} bytes is implausibly large")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"), parse_float=_finite_float, parse_constant=_finite_float)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: header is not valid JSON ({_describe(err)})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: header is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a bitwise-nn model file (header format {header.get('format')!r})")
    version = header.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        readable = " and ".join(str(v) for v in READ_VERSIONS)
        raise ModelFileError(f"{path}: format version {version!r} is not supported (this reader reads {readable})")
    missing, extra = sorted(HEADER_KEYS - header.keys()), sorted(header.keys() - HEADER_KEYS)
    if missing:
        raise ModelFileError(f"{path}: header fields missing: {missing}")
    if extra:
        raise ModelFileError(f"{path}: unexpected header fields: {extra}")
    return header


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 1


def _check_bias_fields(path: Path, i: int, spec: dict[str, Any]) -> None:
    """A version-2 layer entry's ``bias_min``, ``bias_step``, ``bias_bits``: ints that can only describe
    constants within ``[-(n_in + 1), n_in + 1]`` (what the fields decode to is checked once they are read)."""
    low, step, bits = spec["bias_min"], spec["bias_step"], spec["bias_bits"]
    if type(low) is not int or type(step) is not int or type(bits) is not int or step < 1 or bits < 0:
        raise ModelFileError(
            f"{path}: header layer {i} bias fields must be bias_min: int, bias_step: int >= 1, bias_bits: int >= 0"
        )
    bound = bias_bound(spec["n_in"])
    if abs(low) > bound or step > 2 * bound or bits > (2 * bound).bit_length():
        raise ModelFileError(
            f"{path}: header layer {i}: bias_min {low}, bias_step {step}, bias_bits {bits} cannot describe "
            f"constants within [-{bound}, {bound}] (n_in + 1 = {bound})"
        )
    if bits == 0 and step != 1:
        raise ModelFileError(f"{path}: header layer {i}: bias_step {step} with bias_bits 0 (canonical: step 1)")


def _check_header_fields(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    digest = header["sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ModelFileError(f"{path}: header field sha256 is not a hex sha256 digest")
    if header["sign_of_zero"] != SIGN_OF_ZERO or type(header["sign_of_zero"]) is not int:
        raise ModelFileError(f"{path}: unsupported sign(0) rule {header['sign_of_zero']!r} (this engine uses +1)")
    if header["argmax_ties"] != ARGMAX_TIES:
        raise ModelFileError(f"{path}: unsupported argmax tie rule {header['argmax_ties']!r} (need {ARGMAX_TIES!r})")
    if not isinstance(header["metadata"], dict):
        raise ModelFileError(f"{path}: header field metadata is not a JSON object")
    if not _is_count(header["n_pixels"]):
        raise ModelFileError(f"{path}: header field n_pixels must be an integer >= 1, got {header['n_pixels']!r}")
    layers = header["layers"]
    if not isinstance(layers, list) or not layers:
        raise ModelFileError(f"{path}: header field layers must be a non-empty list")
    version = header["format_version"]
    keys = LAYER_KEYS[version]
    for i, spec in enumerate(layers):
        if (
            not isinstance(spec, dict)
            or spec.keys() != keys
            or not _is_count(spec["n_in"])
            or not _is_count(spec["n_out"])
            or not isinstance(spec["mask"], bool)
        ):
            schema = "n_in: int >= 1, n_out: int >= 1, mask: bool"
            if version >= 2:
                schema += ", bias_min: int, bias_step: int, bias_bits: int"
            raise ModelFileError(f"{path}: header layer {i} must be {{{schema}}}")
        if spec["n_in"] > MAX_N_IN:
            raise ModelFileError(f"{path}: header layer {i}: n_in {spec['n_in']} exceeds the largest, {MAX_N_IN}")
        if version >= 2:
            _check_bias_fields(path, i, spec)
    return layers


def _check_encoder(path: Path, header: dict[str, Any], layers: list[dict[str, Any]]) -> BinaryEncoder:
    spec = header["encoder"]
    if not isinstance(spec, dict):
        raise ModelFileError(f"{path}: header field encoder is not a JSON object")
    try:
        encoder = encoder_from_dict(spec)
    except (ConfigError, ValueError, TypeError, OverflowError) as err:
        raise ModelFileError(f"{path}: bad input encoder in header ({err})") from None
    if encoder.to_dict() != spec:
        raise ModelFileError(f"{path}: malformed input encoder in header ({spec!r})")
    if isinstance(encoder, LloydMaxEncoder) and list(encoder.levels) != sorted(encoder.levels):
        raise ModelFileError(f"{path}: lloyd_max encoder levels are not in increasing order")
    problem = layer_problem(encoder, header["n_pixels"], [(spec["n_in"], spec["n_out"]) for spec in layers])
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    return encoder


def _bias_bits(spec: dict[str, Any]) -> int:
    """Bits per constant of a header layer entry (version 1: always 1)."""
    return spec.get("bias_bits", 1)


def _expected_members(layers: list[dict[str, Any]]) -> dict[str, int | None]:
    """Member name -> number of words, as the header's layers require (None: known once the mask is read)."""
    expected: dict[str, int | None] = {}
    for i, spec in enumerate(layers):
        plane = n_words(spec["n_in"] * spec["n_out"])
        expected[f"signs_{i}"] = None if spec["mask"] else plane
        if spec["mask"]:
            expected[f"mask_{i}"] = plane
    expected["biases"] = n_words(sum(spec["n_out"] * _bias_bits(spec) for spec in layers))
    return expected


def _check_members(path: Path, arrays: dict[str, Any], layers: list[dict[str, Any]]) -> None:
    expected = _expected_members(layers)
    missing, extra = sorted(expected.keys() - arrays.keys()), sorted(arrays.keys() - expected.keys())
    if missing:
        raise ModelFileError(f"{path}: missing members {missing} (the header declares them)")
    if extra:
        raise ModelFileError(f"{path}: unexpected members {extra} (the header does not declare them)")
    for name, words in expected.items():
        array = arrays[name]
        if not isinstance(array, np.ndarray) or array.dtype != WORD_DTYPE:
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise ModelFileError(
                f"{path}: dtype mismatch: member {name!r} is {got}, expected uint64 little-endian (<u8)"
            )
        if array.ndim != 1 or (words is not None and array.shape != (words,)):
            raise ModelFileError(
                f"{path}: layer shape mismatch: member {name!r} has shape {array.shape}, the header's layer sizes "
                f"need ({words},)"
            )


def _unpack_plane(path: Path, name: str, words: np.ndarray, n_bits: int) -> np.ndarray:
    bits = unpack_bits(words, len(words) * 64)
    if bits[n_bits:].any():
        raise ModelFileError(f"{path}: member {name!r} has nonzero padding bits")
    return bits[:n_bits]


def _decode_constants(path: Path, i: int, spec: dict[str, Any], bits: np.ndarray) -> np.ndarray:
    """Layer ``i``'s constants ``int32 [n_out]`` from its ``n_out * bias_bits`` stream bits: version 1 (no
    ``bias_bits`` key) bit 1 -> +1, 0 -> -1; version 2 ``bias_min + bias_step * u``, canonical form only."""
    if "bias_bits" not in spec:
        return np.where(bits, 1, -1).astype(np.int32)
    low, step, k = spec["bias_min"], spec["bias_step"], spec["bias_bits"]
    if k == 0:
        return np.full(spec["n_out"], low, dtype=np.int32)
    fields = bits_field(bits, k)  # k <= 32 (header check), so every field fits int64
    largest = int(fields.max())
    bound = bias_bound(spec["n_in"])
    what = f"{path}: layer {i}: non-canonical bias encoding"
    if int(fields.min()) != 0:
        raise ModelFileError(f"{what}: bias_min {low} is not the smallest constant (the fields do not start at 0)")
    if largest < 1 << (k - 1):
        raise ModelFileError(f"{what}: bias_bits {k} is more than the largest field, {largest}, needs")
    if math.gcd(*fields.tolist()) != 1:
        raise ModelFileError(f"{what}: bias_step {step} is not the constants' common step")
    if low + step * largest > bound:  # Python ints: no overflow whatever the header says
        raise ModelFileError(f"{path}: layer {i}: constants reach {low + step * largest}, beyond n_in + 1 = {bound}")
    return (low + step * fields).astype(np.int32)


def _decode_layers(path: Path, arrays: dict[str, np.ndarray], layers: list[dict[str, Any]]) -> PackedNetwork:
    packed = []
    n_biases = np.cumsum([0] + [spec["n_out"] * _bias_bits(spec) for spec in layers])
    biases = _unpack_plane(path, "biases", arrays["biases"], int(n_biases[-1]))
    for i, spec in enumerate(layers):
        n_in, n_out = spec["n_in"], spec["n_out"]
        signs_name = f"signs_{i}"
        signs_words = arrays[signs_name]
        if spec["mask"]:
            mask = _unpack_plane(path, f"mask_{i}", arrays[f"mask_{i}"], n_in * n_out).reshape(n_out, n_in)
            if mask.all():
                raise ModelFileError(f"{path}: layer {i} stores a mask but has no zero weights")
            # Only the nonzero weights have signs, so the header alone cannot size this member.
            nonzero = int(mask.sum())
            if signs_words.shape != (n_words(nonzero),):
                raise ModelFileError(
                    f"{path}: layer shape mismatch: member {signs_name!r} has shape {signs_words.shape}, "
                    f"the mask's {nonzero} nonzero weights need ({n_words(nonzero)},)"
                )
            signs = np.zeros((n_out, n_in), dtype=bool)
            signs[mask] = _unpack_plane(path, signs_name, signs_words, nonzero)
        else:
            signs = _unpack_plane(path, signs_name, signs_words, n_in * n_out).reshape(n_out, n_in)
            mask = np.ones((n_out, n_in), dtype=bool)
        bias = _decode_constants(path, i, spec, biases[n_biases[i] : n_biases[i + 1]])
        packed.append(PackedLayer(signs=pack_bits(signs), mask=pack_bits(mask), bias=bias, n_in=n_in))
    return PackedNetwork(tuple(packed))


def load_bitwise_model(path: str | Path) -> BitwiseModel:
    """Read and check a model file; any problem is a ModelFileError starting with ``path``."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: file not found")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    arrays = _read_members(path)
    header = _parse_header(path, arrays.pop("header", None))
    layers = _check_header_fields(path, header)
    encoder = _check_encoder(path, header, layers)
    _check_members(path, arrays, layers)
    try:
        digest = content_hash(header, arrays)
    except (ValueError, TypeError, RecursionError) as err:
        raise ModelFileError(f"{path}: header cannot be serialized canonically ({_describe(err)})") from None
    if digest != header["sha256"]:
        raise ModelFileError(f"{path}: content hash mismatch: the file was modified or damaged after it was written")
    network = _decode_layers(path, arrays, layers)
    try:
        return BitwiseModel(encoder=encoder, network=network, metadata=header["metadata"])
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
