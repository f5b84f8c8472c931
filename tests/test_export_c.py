"""C export (``bnn_core.c_export``, ``python -m pipeline.export``): the generated C99 library, compiled with
the host compiler, gives exactly the classes and integer scores of ``BitwiseModel`` on every image, for
dense, sparse, multi-plane (lloyd_max, thermometer), integer-threshold and one-layer models, with 32- and
64-bit words and odd layer sizes (padding); it cross-compiles for a Cortex-M7 with the flash and RAM its
header states, and runs bit-exact as a 32-bit ARM Linux binary under qemu. Bad input to the entry point
is one error line, exit status 2, and nothing written.

The cross-compiler tests need ``gcc-arm-none-eabi`` (the library is compiled freestanding, as firmware
is: it needs no C library, so no newlib), ``gcc-arm-linux-gnueabihf`` and ``qemu-user``
(``scripts/system_deps.sh`` installs them) and skip, naming the tool, without them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.c_export import (
    C_FILES,
    SHARED_LIBRARY,
    SHARED_LIBRARY_CFLAGS,
    WORD_SIZES,
    bind_batch,
    c_memory,
    c_sources,
)
from bnn_core.errors import DataError
from bnn_core.input_encoders import LloydMaxEncoder, ThermometerEncoder, ThresholdEncoder
from bnn_core.model_file import load_bitwise_model, save_bitwise_model
from pipeline.config import ExportConfig
from tests.conftest import run

PROJECT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
#: Warnings are errors: the generated code must be clean C99 for any compiler that users point at it.
HOST_CFLAGS = "-O1 -std=c99 -Wall -Wextra -pedantic -Werror"
N_RANDOM_IMAGES = 300


def tool(name: str) -> str:
    """The path of a build tool, or skip the test naming it (``scripts/system_deps.sh`` installs them)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (scripts/system_deps.sh installs it)")
    return path


def host_cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler (cc or gcc) found")
    return cc


# --- models -------------------------------------------------------------------------------------------


def random_layers(
    rng: np.random.Generator, sizes: list[int], sparsity: float, integer_constants: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ternary weights with about ``sparsity`` zeros; constants the paper's +-1, or any integers with
    ``|c| <= n_in + 1`` including both ends (folded thresholds; hidden units always on and always off)."""
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        w = rng.choice(np.array([-1, 1], np.int8), (n_out, n_in)) * (rng.random((n_out, n_in)) >= sparsity)
        if integer_constants:
            bound = n_in + 1
            c = rng.integers(-bound, bound + 1, n_out).astype(np.int32)
            c[: min(2, n_out)] = [-bound, bound][: min(2, n_out)]
        else:
            c = rng.choice(np.array([-1, 1], np.int32), n_out)
        layers.append((w.astype(np.int8), c))
    if sparsity > 0:
        layers[0][0][1] = 0  # a unit with no nonzero weight: a = c
    return layers


def lloyd_max_encoder(rng: np.random.Generator, bits: int) -> LloydMaxEncoder:
    # Skewed pixels, as digits are: most near 0, some near 255, so the boundaries are uneven and fractional.
    pixels = np.concatenate([rng.integers(0, 40, 3000), rng.integers(150, 256, 800), rng.integers(0, 256, 500)])
    return LloydMaxEncoder.fit(pixels.astype(np.uint8), bits)


def make_model(kind: str, seed: int = 0) -> BitwiseModel:
    """Small models of odd sizes (no width a multiple of 32 or 64 except where a full word is the point)."""
    rng = np.random.default_rng(seed)
    if kind == "dense":
        # 9 inputs to the output layer: scores share their parity, so argmax ties are frequent.
        return BitwiseModel.from_layers(ThresholdEncoder(100), random_layers(rng, [45, 70, 9, 10], 0.0, False))
    if kind == "sparse":
        return BitwiseModel.from_layers(ThresholdEncoder(127), random_layers(rng, [37, 65, 129, 64, 7], 0.8, False))
    if kind == "lloyd_max":  # 3 bit-planes of 29 pixels: 87 inputs
        return BitwiseModel.from_layers(lloyd_max_encoder(rng, 3), random_layers(rng, [87, 50, 10], 0.3, False))
    if kind == "thermometer":  # 5 planes of 21 pixels: 105 inputs
        encoder = ThermometerEncoder.evenly_spaced(5)
        return BitwiseModel.from_layers(encoder, random_layers(rng, [105, 97, 33, 12], 0.1, False))
    if kind == "thresholds":  # integer constants up to |c| = n_in + 1 in every layer, 2 lloyd_max planes
        # Boundaries 30, 70 and 145 are whole numbers: a pixel exactly on one falls in the lower cell.
        encoder = LloydMaxEncoder(levels=(10.0, 50.0, 90.0, 200.0))
        return BitwiseModel.from_layers(encoder, random_layers(rng, [62, 64, 65, 31, 5], 0.5, True))
    if kind == "one_layer":  # no hidden layer: input words straight to the scores
        return BitwiseModel.from_layers(ThermometerEncoder((10, 200)), random_layers(rng, [66, 10], 0.0, True))
    raise ValueError(kind)


MODEL_KINDS = ("dense", "sparse", "lloyd_max", "thermometer", "thresholds", "one_layer")


def images_for(model: BitwiseModel, seed: int = 1) -> np.ndarray:
    """Random images, then one constant image per pixel value 0..255 (all 0 and all 255 among them),
    so every row of every plane's truth table is used."""
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 256, (N_RANDOM_IMAGES, model.n_pixels), dtype=np.uint8)
    constant = np.repeat(np.arange(256, dtype=np.uint8)[:, None], model.n_pixels, axis=1)
    return np.concatenate([random, constant])


# --- building and running the export ------------------------------------------------------------------


def write_export(model: BitwiseModel, word_bits: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in c_sources(model, word_bits).items():
        (folder / name).write_text(text)
    return folder


def make(folder: Path, *args: str) -> None:
    result = subprocess.run([tool("make"), "-s", "-C", str(folder), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr, result.stderr


def build(model: BitwiseModel, word_bits: int, folder: Path, cflags: str = HOST_CFLAGS) -> Path:
    """``make`` with the host compiler, as a user would; returns the ``bnn_predict`` binary."""
    write_export(model, word_bits, folder)
    make(folder, f"CC={host_cc()}", f"CFLAGS={cflags}")
    return folder / "bnn_predict"


def run_predict(command: list[str], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run ``bnn_predict -s`` on raw images; returns (classes, scores)."""
    result = subprocess.run([*command, "-s"], input=pixels.tobytes(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    rows = np.array([[int(v) for v in line.split()] for line in result.stdout.decode().splitlines()], dtype=np.int64)
    assert len(rows) == len(pixels)
    return rows[:, 0], rows[:, 1:]


def assert_exact(model: BitwiseModel, pixels: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
    expected_scores = model.forward_counts(pixels)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(classes, model.predict(pixels))


# --- the generated library ----------------------------------------------------------------------------


@pytest.mark.parametrize("word_bits", WORD_SIZES)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_host_build_is_bit_exact(tmp_path, kind, word_bits):
    model = make_model(kind)
    pixels = images_for(model)
    classes, scores = run_predict([str(build(model, word_bits, tmp_path))], pixels)
    assert_exact(model, pixels, classes, scores)
    if kind == "dense":
        # The tie rule is exercised: some images have two classes at the top score (first one wins).
        top = scores.max(axis=1, keepdims=True)
        assert ((scores == top).sum(axis=1) > 1).sum() > 10


def test_model_kinds_cover_what_they_claim():
    """The matrix above tests what its names say: masks, several planes, wide constants, no hidden layer."""
    for word_bits in WORD_SIZES:
        header = c_sources(make_model("sparse"), word_bits)["bnn_model.h"]
        assert "static const bnn_word_t bnn_mask_0" in header
        assert "bnn_mask_" not in c_sources(make_model("dense"), word_bits)["bnn_model.h"]
    assert make_model("lloyd_max").encoder.n_features(1) == 3
    assert make_model("thermometer").encoder.n_features(1) == 5
    thresholds = make_model("thresholds")
    for layer in thresholds.network.layers:
        assert abs(int(layer.bias.min())) == layer.n_in + 1 and int(layer.bias.max()) == layer.n_in + 1
    assert len(make_model("one_layer").network.layers) == 1


@pytest.mark.parametrize("word_bits", WORD_SIZES)
def test_portable_popcount_is_bit_exact(tmp_path, word_bits):
    """The SWAR popcount (compilers without ``__builtin_popcount``) gives the same scores."""
    model = make_model("thresholds", seed=3)
    pixels = images_for(model)
    binary = build(model, word_bits, tmp_path, f"{HOST_CFLAGS} -DBNN_PORTABLE_POPCOUNT")
    assert_exact(model, pixels, *run_predict([str(binary)], pixels))


def test_real_model_file(tmp_path):
    """``tests/data/model_v1.npz`` (a real model file, written by the version-1 writer) against the scores
    recorded in ``model_v1_expected.json`` when it was written, not only against today's engine."""
    model = load_bitwise_model(DATA / "model_v1.npz")
    expected = json.loads((DATA / "model_v1_expected.json").read_text())
    pixels = np.array(expected["pixels"], dtype=np.uint8)
    for word_bits in WORD_SIZES:
        classes, scores = run_predict([str(build(model, word_bits, tmp_path / str(word_bits)))], pixels)
        np.testing.assert_array_equal(scores, expected["counts"])
        np.testing.assert_array_equal(classes, expected["classes"])


def test_shared_library_batch_entry_point(tmp_path):
    """The benchmark hook: ``make libbnn_model.so`` with :data:`SHARED_LIBRARY_CFLAGS`, then
    ``bnn_predict_batch`` through ctypes (:func:`bind_batch`)."""
    model = make_model("sparse", seed=5)
    folder = write_export(model, 64, tmp_path)
    make(folder, f"CC={host_cc()}", f"CFLAGS={SHARED_LIBRARY_CFLAGS}", SHARED_LIBRARY)
    predict = bind_batch(ctypes.CDLL(str(folder / SHARED_LIBRARY)), model.n_pixels, model.n_classes)
    pixels = images_for(model)
    classes, scores = predict(pixels)
    assert classes.dtype == np.int64 and scores.dtype == np.int32
    assert_exact(model, pixels, classes, scores)
    with pytest.raises(ValueError, match="expected pixels"):
        predict(pixels[:, :-1])


def test_main_reads_until_eof_and_refuses_a_truncated_image(tmp_path):
    model = make_model("dense")
    binary = str(build(model, 32, tmp_path))
    empty = subprocess.run([binary], input=b"", capture_output=True)
    assert (empty.returncode, empty.stdout) == (0, b"")
    pixels = images_for(model)[:3]
    plain = subprocess.run([binary], input=pixels.tobytes(), capture_output=True)
    assert plain.stdout.decode().split() == [str(c) for c in model.predict(pixels)]
    truncated = subprocess.run([binary], input=pixels.tobytes()[:-1], capture_output=True)
    assert truncated.returncode == 1
    assert b"truncated image" in truncated.stderr
    assert len(truncated.stdout.decode().splitlines()) == 2  # the whole images before it are still answered
    assert subprocess.run([binary, "-x"], capture_output=True).returncode == 2


def test_inference_code_is_integer_only_and_heap_free():
    """No floating point, no heap, no library calls in the inference path (``bnn_model.c`` and the data)."""
    sources = c_sources(make_model("lloyd_max"), 32)
    code = sources["bnn_model.c"] + sources["bnn_model.h"]
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.DOTALL)  # comments may say anything
    for word in ("float", "double", "malloc", "calloc", "free(", "#include <stdio.h>", "#include <math.h>"):
        assert word not in code


def has_mask(layer) -> bool:
    """True if the packed layer has zero weights (the export then stores its mask plane)."""
    return int(np.bitwise_count(layer.mask).sum()) < layer.n_in * layer.n_out


def test_header_states_flash_and_ram():
    """The figures in the header comment are the bytes of the arrays and buffers the code declares."""
    sparse = make_model("sparse")
    # Layer 2 made dense (its zeros become +1): a mix of layers with and without masks.
    ternary = [layer.to_ternary() for layer in sparse.network.layers]
    ternary[2] = (np.where(ternary[2][0] == 0, 1, ternary[2][0]).astype(np.int8), ternary[2][1])
    model = BitwiseModel.from_layers(sparse.encoder, ternary)
    assert [has_mask(layer) for layer in model.network.layers] == [True, True, False, True]
    for word_bits in WORD_SIZES:
        memory = c_memory(model, word_bits)
        row_bytes = [-(-layer.n_in // word_bits) * word_bits // 8 for layer in model.network.layers]
        plane_bytes = [r * layer.n_out for r, layer in zip(row_bytes, model.network.layers, strict=True)]
        assert memory.weights == sum(plane_bytes)
        assert memory.masks == sum(
            b for b, layer in zip(plane_bytes, model.network.layers, strict=True) if has_mask(layer)
        )
        assert memory.constants == 4 * sum(model.layer_sizes[1:])
        assert memory.input_code == 32
        # Layer l reads buffer l % 2: buffer 0 holds the inputs of layers 0 and 2, buffer 1 of layers 1 and 3.
        assert memory.activations == max(row_bytes[0], row_bytes[2]) + max(row_bytes[1], row_bytes[3])
        assert memory.scores == 4 * model.n_classes
        header = c_sources(model, word_bits)["bnn_model.h"]
        assert f"Flash (const data): {memory.flash} bytes" in header
        assert f"RAM (static buffers): {memory.ram} bytes" in header
        assert f"#define BNN_FLASH_BYTES {memory.flash}\n" in header
        assert f"#define BNN_RAM_BYTES {memory.ram}\n" in header


def test_unsupported_word_size_and_encoder_are_refused():
    model = make_model("dense")
    with pytest.raises(ValueError, match="word_bits must be one of"):
        c_sources(model, 16)

    @dataclasses.dataclass(frozen=True)
    class NeighbourEncoder:
        """Binary, one plane, but each bit looks at the next pixel too: no per-pixel table can code it."""

        name: ClassVar[str] = "neighbour"
        is_binary: ClassVar[bool] = True

        def n_features(self, n_pixels: int) -> int:
            return n_pixels

        def encode_bits(self, pixels: np.ndarray) -> np.ndarray:
            pixels = np.asarray(pixels, dtype=np.int64)
            return pixels > np.roll(pixels, 1, axis=-1)

        def to_dict(self) -> dict[str, Any]:
            return {"method": self.name}

    rng = np.random.default_rng(0)
    odd = BitwiseModel.from_layers(NeighbourEncoder(), random_layers(rng, [16, 4], 0.0, False))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not pixelwise plane-major"):
        c_sources(odd, 32)


# --- real targets: Cortex-M7 (bare metal) and 32-bit ARM Linux under qemu -------------------------------


def section_sizes(size_tool: str, obj: Path) -> dict[str, int]:
    """``size -A``: section name -> bytes."""
    output = subprocess.run([size_tool, "-A", str(obj)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


@pytest.mark.slow  # two cross-compiles
@pytest.mark.parametrize("word_bits", WORD_SIZES)
def test_cortex_m7_object_has_the_stated_flash_and_ram(tmp_path, word_bits):
    """``arm-none-eabi-gcc -mcpu=cortex-m7 -mthumb -Os -ffreestanding``: the model is all ``.rodata``
    (flash), the activation buffers all ``.bss``, nothing in ``.data``; the sizes are the ones the header
    states. Freestanding: ``bnn_model.c`` uses only the compiler's own headers (stdint.h, limits.h,
    stddef.h), so it builds without a C library."""
    gcc, size = tool("arm-none-eabi-gcc"), tool("arm-none-eabi-size")
    model = make_model("thresholds")
    folder = write_export(model, word_bits, tmp_path)
    obj = folder / "bnn_model.o"
    cmd = [gcc, "-mcpu=cortex-m7", "-mthumb", "-Os", "-ffreestanding", "-std=c99", "-Wall", "-Wextra", "-pedantic"]
    cmd.append("-Werror")
    result = subprocess.run([*cmd, "-c", "-o", str(obj), str(folder / "bnn_model.c")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sections = section_sizes(size, obj)
    memory = c_memory(model, word_bits)
    assert sections.get(".data", 0) == 0
    # 32-bit words: exact. 64-bit words: each uint64_t array may start on an 8-byte boundary.
    layers = model.network.layers
    n_arrays = 1 + 2 * len(layers) + sum(has_mask(layer) for layer in layers)  # input code; signs, k; masks
    slack = 0 if word_bits == 32 else 8
    assert memory.flash <= sections[".rodata"] <= memory.flash + slack * n_arrays
    assert memory.ram <= sections[".bss"] <= memory.ram + slack * 3  # two word buffers, the scores
    print(f"cortex-m7 {word_bits}-bit words: {subprocess.run([size, str(obj)], capture_output=True, text=True).stdout}")


@pytest.mark.slow  # cross-compiles and emulates
@pytest.mark.parametrize("word_bits", WORD_SIZES)
def test_arm_linux_binary_under_qemu_is_bit_exact(tmp_path, word_bits):
    """The whole program for 32-bit ARM (armhf, static), run by ``qemu-arm``: same classes and scores."""
    gcc, qemu = tool("arm-linux-gnueabihf-gcc"), tool("qemu-arm")
    model = make_model("thresholds", seed=7)
    folder = write_export(model, word_bits, tmp_path)
    make(folder, f"CC={gcc}", f"CFLAGS={HOST_CFLAGS.replace('-O1', '-O2')} -static")
    pixels = images_for(model)
    assert_exact(
        model, pixels, *run_predict([qemu, "-L", "/usr/arm-linux-gnueabihf", str(folder / "bnn_predict")], pixels)
    )


# --- the entry point: python -m pipeline.export --------------------------------------------------------


def export_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pipeline.export", *overrides], cwd, check=False, PYTHONPATH=str(PROJECT))


def listing(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "bnn.npz"
    save_bitwise_model(path, make_model("thresholds"))
    return path


@pytest.mark.slow  # a fresh interpreter imports hydra (~1-2 s)
def test_cli_writes_exactly_the_generated_folder(tmp_path, model_file):
    before = listing(tmp_path)
    result = export_cli(tmp_path, "word_bits=64")
    assert result.returncode == 0, result.stderr
    memory = c_memory(load_bitwise_model(model_file), 64)
    assert result.stdout.splitlines() == [
        f"export: c library, 64-bit words -> dist/c: flash {memory.flash} bytes (const data), "
        f"RAM {memory.ram} bytes (static buffers); `make -C dist/c` builds bnn_predict"
    ]
    expected = c_sources(load_bitwise_model(model_file), 64)
    after = listing(tmp_path)
    # The folder and its parent, the four files, nothing else (no outputs/, .hydra/, temp folders).
    assert after == {
        **before,
        "dist": b"<dir>",
        "dist/c": b"<dir>",
        **{f"dist/c/{n}": t.encode() for n, t in expected.items()},
    }
    assert sorted(expected) == sorted(C_FILES)
    # overwrite=true replaces the folder, leaving nothing of the old one and no temporary sibling.
    (tmp_path / "dist" / "c" / "stale.txt").write_text("old")
    result = export_cli(tmp_path, "overwrite=true", "word_bits=32")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["c"]
    assert sorted(p.name for p in (tmp_path / "dist" / "c").iterdir()) == sorted(C_FILES)
    assert "#define BNN_WORD_BITS 32\n" in (tmp_path / "dist" / "c" / "bnn_model.h").read_text()


@pytest.mark.slow  # a fresh interpreter per case (~1-2 s each)
@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("damaged model", ["model_file=models/damaged.npz"], "models/damaged.npz: "),
        ("truncated model", ["model_file=models/truncated.npz"], "models/truncated.npz: "),
        ("missing model", ["model_file=models/none.npz"], "models/none.npz: not found; the evaluate stage makes"),
        ("word size", ["word_bits=16"], "word_bits: must be one of (32, 64), got 16"),
        ("format", ["format=onnx"], "format: must be one of ('c',), got 'onnx'"),
        ("existing folder", ["output=existing"], "existing: folder exists and is not empty (pass overwrite=true"),
        ("output is a file", ["output=models/bnn.npz", "overwrite=true"], "models/bnn.npz: exists and is not a folder"),
        ("output holds the model", ["output=models", "overwrite=true"], "models: refusing to write over a folder"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, model_file, case, overrides, message):
    (tmp_path / "models" / "damaged.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "models" / "truncated.npz").write_bytes(model_file.read_bytes()[:-100])
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    result = export_cli(tmp_path, *overrides)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export: "), result.stderr
    assert message in lines[0]
    assert result.stdout == ""
    assert listing(tmp_path) == before


def test_failed_write_leaves_no_folder(tmp_path, model_file, monkeypatch):
    """An error while the files are written (disk full, say) leaves neither the output nor a temp folder."""
    from pipeline import export as export_module

    calls = []

    def failing_write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, text, *args, **kwargs)

    original = Path.write_text
    monkeypatch.setattr(Path, "write_text", failing_write_text)
    output = tmp_path / "out" / "c"
    with pytest.raises(DataError, match="cannot write the export .No space left on device"):
        export_module.export(ExportConfig(model_file=str(model_file), output=str(output)))
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []
