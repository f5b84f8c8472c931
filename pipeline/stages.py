"""The stage graph, declared once: what each stage reads, which config keys decide it, what it writes.

    binarize -> pretrain -> finetune -> evaluate        (+ baselines, report)
                                         evaluate -> export    (the model as a C library, dist/c)

:data:`STAGES` is the single source of the training chain; :data:`COMMANDS` adds the stages that are
stand-alone commands with their own config (``conf/<name>.yaml``), which ``pipeline.run`` does not chain.
Two things are made from these tables (``pipeline.run`` walks STAGES only):

- ``dvc.yaml`` (``make dvc.yaml``, i.e. ``python -m pipeline.stages``): every stage's params, its
  artifact deps and outs (paths from :class:`pipeline.artifacts.Artifacts`) and its **code deps**, which
  are the stage module's import closure inside the repository (:func:`code_deps`), so they are right by
  construction. A test fails when the committed ``dvc.yaml`` is not what this module generates.
- ``pipeline.run`` (the whole chain per Hydra sweep job) walks the same table in the same order and keys
  its stage cache on the same params, code deps and upstream artifacts.

The table is Python rather than ``dvc.yaml`` being read back because the code deps must be computed
(an import closure), and a generated file can be checked against its generator, while hand-edited YAML
cannot be checked against anything.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import Artifacts

#: The repository root: the folder that holds ``pipeline/`` and ``bnn_core/``.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Top-level packages of the repository; imports of anything else (torch, numpy, ...) are not code deps.
PROJECT_PACKAGES = ("bnn_core", "pipeline")
#: The Hydra arguments every DVC stage runs with: compose the committed ``params.yaml`` (which
#: ``dvc exp run -S`` rewrites), write no Hydra logs or ``.hydra`` folders into the repository.
HYDRA_ARGS = (
    "--config-dir . --config-name params hydra.output_subdir=null hydra.run.dir=outputs/dvc "
    "hydra/job_logging=none hydra/hydra_logging=none"
)


@dataclass(frozen=True)
class Output:
    """An artifact a stage writes, and how DVC keeps it.

    ``cache=False``: small text or picture outputs that git tracks (metrics, plots, reports);
    ``metric``: listed under ``metrics`` (what ``dvc metrics show/diff`` compares);
    ``plot``: listed under ``plots`` with these DVC plot properties (``x``, ``y``, ``template``).
    """

    artifact: str
    cache: bool = True
    metric: bool = False
    plot: dict[str, str] | None = None


@dataclass(frozen=True)
class Stage:
    """One stage: module ``pipeline.<name>`` with a ``run(ctx)`` function and a ``main`` command line.

    ``params``: the config keys (sections or dotted keys) that decide its outputs, beyond its inputs.
    ``reads``: artifacts of earlier stages it reads. ``writes``: its outputs. ``optional``: in
    ``pipeline.run`` it runs only when ``chain.baselines`` is set (``dvc repro`` always runs it).
    ``description``: one line, DVC's ``desc`` (``dvc stage list`` shows it).
    """

    name: str
    params: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[Output, ...]
    optional: bool = False
    description: str = field(default="", compare=False)

    @property
    def module(self) -> str:
        return f"pipeline.{self.name}"

    @property
    def outputs(self) -> list[str]:
        return [out.artifact for out in self.writes]


#: Round 1 and the baselines train; what decides a training run besides its own section.
_TRAINING = (
    "seed",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "evaluate.batch_size",
)
_CURVE = {"x": "epoch", "y": "val_accuracy"}

STAGES: tuple[Stage, ...] = (
    Stage(
        "binarize",
        params=("seed", "data"),
        reads=(),
        writes=(Output("features"), Output("input_encoder")),
        description="split the data source, fit the input binarizer on the training split, encode",
    ),
    Stage(
        "pretrain",
        params=(*_TRAINING, "data.n_classes", "model", "augment", "pretrain"),
        reads=("features", "input_encoder"),
        writes=(Output("pretrained"), Output("pretrain_history", cache=False, plot=_CURVE)),
        description="round 1: the tanh-compressed real-valued network",
    ),
    Stage(
        "finetune",
        # model.hidden and data.n_classes shape the network when finetune.init=random.
        params=(*_TRAINING, "data.n_classes", "model.hidden", "model.norm", "augment", "finetune"),
        reads=("features", "input_encoder", "pretrained"),
        writes=(Output("finetuned"), Output("finetune_history", cache=False, plot=_CURVE)),
        description="round 2: noisy backpropagation of the bitwise network",
    ),
    Stage(
        "evaluate",
        # data.source, finetune.sparsity and finetune.grad go into the model file's metadata.
        params=("evaluate", "data.source", "model.norm", "finetune.sparsity", "finetune.grad"),
        reads=("features", "input_encoder", "pretrained", "finetuned"),
        writes=(Output("bnn_model"), Output("cost_table", cache=False), Output("metrics", cache=False, metric=True)),
        description="test accuracy, cost, and the exported model file (three engines must agree)",
    ),
    Stage(
        "baselines",
        params=(*_TRAINING, "data", "model", "augment", "pretrain"),
        reads=("features", "input_encoder"),
        writes=(Output("baselines", cache=False),),
        optional=True,
        description="the real-valued rows of the paper's comparison, trained like round 1",
    ),
    Stage(
        "report",
        params=("data.binarize",),
        reads=("metrics", "baselines", "pretrain_history", "finetune_history"),
        writes=(
            Output("report", cache=False),
            Output("tradeoff_plot", cache=False),
            Output("training_curves", cache=False),
            Output(
                "comparison",
                cache=False,
                # .dvc/plots/tradeoff.json: log bit-ops axis, accuracy zoomed to the data, a label per network.
                plot={
                    "template": "tradeoff",
                    "x": "bit_ops",
                    "y": "test_accuracy",
                    "title": "test accuracy against bit-ops per image",
                    "x_label": "bit-ops per image (log scale)",
                    "y_label": "test accuracy",
                },
            ),
        ),
        optional=True,
        description="the paper's comparison, its accuracy / bit-ops plot and the training curves",
    ),
)


@dataclass(frozen=True)
class Command:
    """A DVC stage that runs a stand-alone command (``python -m pipeline.<name> <arguments>``, configured by
    ``conf/<name>.yaml`` rather than ``params.yaml``): it follows the chain in ``dvc repro`` but is not a
    step of ``pipeline.run``. ``reads``/``writes``: artifact names, as for :class:`Stage`."""

    name: str
    arguments: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    description: str = field(default="", compare=False)

    @property
    def module(self) -> str:
        return f"pipeline.{self.name}"


COMMANDS: tuple[Command, ...] = (
    Command(
        "export",
        # overwrite: dvc repro removes a stage's outs before it runs, so this only matters by hand
        arguments="overwrite=true",
        reads=("bnn_model",),
        writes=("c_library",),
        description="the exported model as a dependency-free C99 library for microcontrollers (bit-exact)",
    ),
)


def stage(name: str) -> Stage:
    found = [s for s in STAGES if s.name == name]
    if not found:
        raise KeyError(f"no stage called {name!r}")
    return found[0]


def producers() -> dict[str, Stage]:
    """Artifact name -> the stage that writes it."""
    return {out: s for s in STAGES for out in s.outputs}


# --- code deps: the import closure inside the repository ------------------------------------------------


def _module_file(module: str) -> Path | None:
    """The repository file of a project module (``pkg/__init__.py`` for a package), else None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` in ``path`` names, at any depth (functions included), except those only
    under ``if TYPE_CHECKING:`` (never executed). ``from pkg import name`` yields ``pkg`` and ``pkg.name``
    (``name`` may be a submodule)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _with_parent_packages(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def code_deps(module: str) -> list[str]:
    """The repository files (relative POSIX paths, sorted) that importing ``module`` executes: the module,
    every project module it imports, transitively, and their packages' ``__init__.py``."""
    seen: set[Path] = set()
    pending = _with_parent_packages(module)
    while pending:
        path = _module_file(pending.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for imported in _imported_modules(path):
            pending.extend(_with_parent_packages(imported))
    return sorted(path.relative_to(REPO_ROOT).as_posix() for path in seen)


# --- dvc.yaml ---------------------------------------------------------------------------------------------

DVC_YAML_HEADER = """\
# GENERATED from pipeline/stages.py by `make dvc-yaml`: edit the stage table there, not this file
# (a test fails when the two differ). Code deps are each stage module's import closure in the repo.
# Stages read the composed params.yaml, which `dvc exp run -S key=value` rewrites from conf/
# (DVC's Hydra composition, .dvc/config).
"""


def dvc_stage(entry: Stage) -> dict[str, Any]:
    """One stage of ``dvc.yaml``: desc, cmd, deps (artifacts read, then code), params, outs, metrics, plots."""
    paths = Artifacts(Path())
    spec: dict[str, Any] = {
        "desc": entry.description,
        "cmd": f"python -m {entry.module} ${{hydra_args}}",
        "deps": [paths.relative(name) for name in entry.reads] + code_deps(entry.module),
        "params": list(entry.params),
    }
    groups: dict[str, list[Any]] = {"outs": [], "metrics": [], "plots": []}
    for out in entry.writes:
        group = "metrics" if out.metric else "plots" if out.plot else "outs"
        options = {} if out.cache else {"cache": False}
        options.update(out.plot or {})
        path = paths.relative(out.artifact)
        groups[group].append({path: options} if options else path)
    spec.update({group: items for group, items in groups.items() if items})
    return spec


def dvc_command(entry: Command) -> dict[str, Any]:
    """One stand-alone command of ``dvc.yaml``: its config file is a dep, like its code; no params."""
    paths = Artifacts(Path())
    return {
        "desc": entry.description,
        "cmd": f"python -m {entry.module} {entry.arguments}".strip(),
        "deps": [paths.relative(name) for name in entry.reads]
        + [f"conf/{entry.name}.yaml"]
        + code_deps(entry.module),
        "outs": [paths.relative(name) for name in entry.writes],
    }


def render_dvc_yaml() -> str:
    stages = {s.name: dvc_stage(s) for s in STAGES} | {c.name: dvc_command(c) for c in COMMANDS}
    document = {"vars": [{"hydra_args": HYDRA_ARGS}], "stages": stages}
    body = yaml.safe_dump(document, sort_keys=False, width=120, default_flow_style=False)
    return DVC_YAML_HEADER + body


def main() -> None:
    from pipeline.files import write_text

    target = REPO_ROOT / "dvc.yaml"
    write_text(target, render_dvc_yaml())
    print(f"stages: wrote {target}")


if __name__ == "__main__":
    main()
