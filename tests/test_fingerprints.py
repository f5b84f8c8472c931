"""Files handed from stage to stage: each output records what it was made from, a stage that reads several
refuses a set that does not belong together, and a damaged one is a one-line error naming its stage.

The chain runs in-process on a tiny IDX folder (4x4 images, 16-wide networks, one epoch a round); the faults
are real files: truncated, malformed, missing, or made from another version of an input.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnn_core.errors import DataError
from pipeline.artifacts import (
    MADE_FROM,
    Artifacts,
    check_made_together,
    content_digest,
    load_checkpoint,
    read_features,
    read_input_encoder,
    read_json_artifact,
    save_checkpoint,
)
from pipeline.config import Config, validate
from pipeline.networks_io import load_bitwise, load_compressed
from pipeline.stage import StageContext, make_tracker
from tests.test_config import composed
from tests.test_datasets import write_idx_folder
from tests.test_evaluate import run_in_process


def chain_config(root: Path, *overrides: str) -> Config:
    """The tiny chain's config: data in ``<root>/idx``, MLflow in ``<root>/mlflow.db`` (the chain's, whichever
    folder a test runs a stage in: a new store costs seconds)."""
    return validate(
        composed(
            [
                "data=idx",
                f"data.path={root / 'idx'}",
                "data.split.val=20",
                "experiment=smoke",
                "model.hidden=[16,16]",
                f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                *overrides,
            ]
        )
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """binarize, pretrain and finetune run in ``root``: a consistent set for evaluate."""
    root = tmp_path_factory.mktemp("chain")
    write_idx_folder(root / "idx", n_train=120, n_test=30, gz=False)
    config = chain_config(root)
    for name in ("binarize", "pretrain", "finetune"):
        run_in_process(name, config, root)
    return root


def copy_of(chain: Path, dest: Path) -> Artifacts:
    """The chain's artifacts copied into ``dest`` (each test damages its own copy)."""
    source, copy = Artifacts(chain), Artifacts(dest)
    for name in ("features", "input_encoder", "pretrained", "finetuned", "pretrain_history", "finetune_history"):
        copy.path(name).parent.mkdir(parents=True, exist_ok=True)
        copy.path(name).write_bytes(source.path(name).read_bytes())
    return copy


def evaluate_context(root: Path, config: Config) -> StageContext:
    from pipeline.tracking import StageTracker

    # never started: the checks under test fail before anything is logged
    return StageContext("evaluate", config, Artifacts(root), StageTracker(config.tracking.uri, "x", "evaluate"))


# --- lineage (issue 13, defect 2) ---------------------------------------------------------------------------


def test_checkpoints_record_the_digests_of_what_their_stage_read(chain):
    artifacts = Artifacts(chain)
    features, encoder = content_digest(artifacts.features), content_digest(artifacts.input_encoder)
    assert load_checkpoint(artifacts.pretrained)[MADE_FROM] == {"features": features, "input_encoder": encoder}
    assert load_checkpoint(artifacts.finetuned)[MADE_FROM] == {
        "features": features,
        "input_encoder": encoder,
        "pretrained": content_digest(artifacts.pretrained),
    }


def test_evaluate_accepts_a_chain_made_together_and_records_it(chain):
    from pipeline.evaluate import check_inputs

    artifacts = Artifacts(chain)
    record = check_inputs(
        evaluate_context(chain, chain_config(chain)),
        load_checkpoint(artifacts.pretrained),
        load_checkpoint(artifacts.finetuned),
    )
    assert record == {name: content_digest(artifacts.path(name)) for name in record}
    assert sorted(record) == ["features", "finetuned", "input_encoder", "pretrained"]


def test_evaluate_refuses_round_one_rerun_at_another_width_and_names_finetune(chain, tmp_path):
    """The issue's reproduction: round 1 re-run by hand at another width, round 2 not: evaluate must not mix
    the two networks' accuracy and cost."""
    from pipeline.evaluate import run

    artifacts = copy_of(chain, tmp_path)
    run_in_process("pretrain", chain_config(chain, "model.hidden=[8,8]"), tmp_path)
    with pytest.raises(DataError) as refused:
        run(evaluate_context(tmp_path, chain_config(chain)))
    message = str(refused.value)
    assert f"{artifacts.finetuned} was made from another models/pretrained.pt" in message
    assert "finetune stage" in message and "python -m pipeline.finetune" in message
    assert not artifacts.metrics.exists() and not artifacts.bnn_model.exists()


def test_evaluate_refuses_features_rebuilt_after_the_networks(chain, tmp_path):
    from pipeline.evaluate import run

    artifacts = copy_of(chain, tmp_path)
    write_idx_folder(tmp_path / "idx", n_train=120, n_test=30, gz=False, rng=np.random.default_rng(1))
    run_in_process("binarize", chain_config(chain, f"data.path={tmp_path / 'idx'}"), tmp_path)
    with pytest.raises(DataError, match=r"pretrained\.pt was made from another data/features\.npz .* pretrain stage"):
        run(evaluate_context(tmp_path, chain_config(chain)))
    assert not artifacts.metrics.exists()


def test_finetune_refuses_a_round_one_made_from_other_features(chain, tmp_path):
    copy_of(chain, tmp_path)
    write_idx_folder(tmp_path / "idx", n_train=120, n_test=30, gz=False, rng=np.random.default_rng(1))
    run_in_process("binarize", chain_config(chain, f"data.path={tmp_path / 'idx'}"), tmp_path)
    before = Artifacts(tmp_path).finetuned.read_bytes()
    with pytest.raises(DataError, match=r"pretrained\.pt was made from another data/features\.npz .* pretrain stage"):
        run_in_process("finetune", chain_config(chain), tmp_path)
    assert Artifacts(tmp_path).finetuned.read_bytes() == before


def test_evaluate_refuses_settings_other_than_round_two_was_trained_with(chain):
    from pipeline.evaluate import check_inputs

    artifacts = Artifacts(chain)
    ctx = evaluate_context(chain, chain_config(chain, "finetune.sparsity=0.5"))
    with pytest.raises(DataError, match=r"trained with finetune\.sparsity=0\.0, this run has finetune\.sparsity=0\.5"):
        check_inputs(ctx, load_checkpoint(artifacts.pretrained), load_checkpoint(artifacts.finetuned))


def test_a_checkpoint_written_before_records_existed_is_refused(chain, tmp_path):
    from pipeline.evaluate import run

    artifacts = copy_of(chain, tmp_path)
    old = {k: v for k, v in load_checkpoint(artifacts.finetuned).items() if k != MADE_FROM}
    with artifacts.finetuned.open("wb") as handle:  # as the old save_checkpoint wrote it: no record
        torch.save(old, handle)
    with pytest.raises(DataError, match=r"finetuned\.pt: does not record what it was made from .* finetune stage"):
        run(evaluate_context(tmp_path, chain_config(chain)))


def test_two_records_that_disagree_on_an_input_not_present_are_refused(tmp_path):
    artifacts = Artifacts(tmp_path)
    with pytest.raises(DataError, match=r"metrics\.json and reports/baselines\.json were made from different .*"):
        check_made_together(artifacts, {"metrics": {"features": "a" * 16}, "baselines": {"features": "b" * 16}})
    check_made_together(artifacts, {"metrics": {"features": "a" * 16}, "baselines": {"features": "a" * 16}})


def write_report_inputs(artifacts: Artifacts, metrics_record: dict, baselines_record: dict | None) -> None:
    row = {"test_accuracy": 0.5, "macs_per_example": 10, "weight_bits": 320}
    baselines = {"real_input": row, "binary_input": row}
    if baselines_record is not None:
        baselines[MADE_FROM] = baselines_record
    artifacts.metrics.parent.mkdir(parents=True, exist_ok=True)
    artifacts.metrics.write_text(json.dumps({MADE_FROM: metrics_record}))
    artifacts.baselines.write_text(json.dumps(baselines))


def test_report_refuses_metrics_and_baselines_made_from_other_features(chain, tmp_path):
    from pipeline.report import read_inputs

    artifacts = copy_of(chain, tmp_path)
    features = content_digest(artifacts.features)
    write_report_inputs(artifacts, {"features": features}, {"features": "0" * 16})
    with pytest.raises(DataError, match=r"baselines\.json was made from another data/features\.npz .* baselines"):
        read_inputs(artifacts)
    write_report_inputs(artifacts, {"features": features}, {"features": features})
    read_inputs(artifacts)
    write_report_inputs(artifacts, {"features": features}, None)  # written before baselines recorded inputs
    with pytest.raises(DataError, match=r"baselines\.json: does not record .* baselines stage"):
        read_inputs(artifacts)
    artifacts.metrics.write_text(json.dumps({"bnn": {}}))  # written before metrics recorded their inputs
    with pytest.raises(DataError, match=r"metrics\.json: does not record .* evaluate stage"):
        read_inputs(artifacts)


# --- damaged stage inputs (issue 13, defect 7, and torch's weights_only hint) ---------------------------------


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_truncated_features_name_the_file_and_binarize(chain, tmp_path):
    artifacts = copy_of(chain, tmp_path)
    with pytest.raises(DataError, match=r"features\.npz: truncated or damaged features file .* binarize stage"):
        read_features(truncated(artifacts.features))
    np.savez(artifacts.features, x_train=np.zeros(3))  # a valid archive of something else
    with pytest.raises(DataError, match=r"features\.npz: not a features file \(no array .* binarize stage"):
        read_features(artifacts.features)


@pytest.mark.parametrize(
    "content",
    [b'{"encoder": {"method": "thr', b"\xff\xfe\x00garbage", b"[1, 2]", b'{"encoder": {"method": "magic"}}', b"{}"],
    ids=["truncated", "binary", "list", "unknown method", "no encoder"],
)
def test_malformed_input_encoder_names_the_file_and_binarize(tmp_path, content):
    path = Artifacts(tmp_path).input_encoder
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"input_encoder\.json: .*; it is made by the binarize stage"):
        read_input_encoder(path)


def test_missing_inputs_name_the_stage_that_makes_them(tmp_path):
    artifacts = Artifacts(tmp_path)
    for name, stage in [("baselines", "baselines"), ("metrics", "evaluate")]:
        with pytest.raises(DataError, match=rf"{name}\.json: not found; it is made by the {stage} stage"):
            read_json_artifact(artifacts.path(name))
    with pytest.raises(DataError, match=r"finetuned\.pt: not found; it is made by the finetune stage"):
        load_checkpoint(artifacts.finetuned)


def test_damaged_checkpoints_name_their_stage_and_never_suggest_weights_only_false(chain, tmp_path):
    artifacts = copy_of(chain, tmp_path)
    messages = []
    with pytest.raises(DataError) as err:
        load_compressed(truncated(artifacts.pretrained))
    messages.append(str(err.value))
    with artifacts.finetuned.open("wb") as handle:  # a pickled object: weights_only refuses it
        pickle.dump({"state_dict": Path("x")}, handle)
    with pytest.raises(DataError) as err:
        load_bitwise(artifacts.finetuned)
    messages.append(str(err.value))
    save_checkpoint(artifacts.finetuned, {"state_dict": {}})  # loads, but is no network
    with pytest.raises(DataError) as err:
        load_bitwise(artifacts.finetuned)
    messages.append(str(err.value))
    assert "pretrained.pt: truncated or not a checkpoint" in messages[0] and "pretrain stage" in messages[0]
    assert "finetuned.pt: refused (it holds Python objects" in messages[1] and "finetune stage" in messages[1]
    assert "finetuned.pt: not a round-2 checkpoint (KeyError" in messages[2] and "finetune stage" in messages[2]
    for message in messages:
        assert "weights_only" not in message and "likely succeed" not in message and "\n" not in message


# --- pipeline.run's stage cache (issue 13, defect 1) ---------------------------------------------------------


def test_stage_cache_says_what_it_reused_and_reruns_an_entry_whose_output_changed(chain, tmp_path, capsys):
    from pipeline import stages
    from pipeline.run import _run_cached, key_inputs, stage_key
    from tests.test_stages import idx_config

    cfg, config = idx_config(chain / "idx")
    binarize = stages.stage("binarize")
    inputs = key_inputs(binarize, cfg, config, {})
    stage_dir = tmp_path / f"binarize-{stage_key(inputs)}"
    with make_tracker("pipeline", chain_config(chain)) as tracker:
        _run_cached(binarize, stage_dir, inputs, config, tracker, {})
        features = Artifacts(stage_dir).features
        made = features.read_bytes()
        capsys.readouterr()
        _run_cached(binarize, stage_dir, inputs, config, tracker, {})
        reused = capsys.readouterr().out
        truncated(features)
        _run_cached(binarize, stage_dir, inputs, config, tracker, {})
        rerun = capsys.readouterr().out
    assert f"binarize: reusing {stage_dir}" in reused
    assert "same seed, data" in reused and "same 4 data source files by content" in reused
    assert f"binarize: not reusing {stage_dir}: data/features.npz changed or missing since" in rerun
    assert features.read_bytes() == made
    assert json.loads((stage_dir / ".key.json").read_text())["outputs"]["data/features.npz"] == content_digest(features)
