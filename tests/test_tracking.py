"""``track.to``: every round's metrics reach TensorBoard, W&B (offline) and MLflow, read back
with each tool's own reader (TensorBoard's EventAccumulator, MLflow's client, and W&B's record
protobufs from the run's .wandb log) and compared with the run folder's metrics.jsonl; a resumed
run sends each tracker only the rounds it lacked; bad settings are refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401  (fixture)

from fedlora import cli
from fedlora.config import load_config
from fedlora.engine import Simulator, run_experiment


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The records of the run's one offline W&B log."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return wandb_log(path)


def wandb_log(path: Path) -> list:
    """The records of an offline .wandb log: LevelDB-style blocks of 32 KiB after a 7-byte header,
    each fragment a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7 or data[pos + 4 : pos + 7] == b"\0\0\0":  # block trailer / padding
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return wandb_history_of(path)


def wandb_history_of(path: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for r in wandb_log(path):
        if r.WhichOneof("record_type") == "history":
            row = {item_key(i): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(row["_step"]), {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def mlflow_history(output_dir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)}


def test_every_round_reaches_all_three_trackers(tiny_models, tmp_path, offline, capsys):  # noqa: F811
    out = tmp_path / "runs"
    code = cli.main(["run", *overrides(tiny_models["bert"], out, fed__method="fedex", track__to="tensorboard,wandb,mlflow", name="tracked")])
    assert code == 0, capsys.readouterr().err
    run_dir = out / "tracked"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3]

    board = tensorboard_scalars(run_dir / "tensorboard")
    for key in ("eval_accuracy", "train_loss", "bytes_up"):
        assert [s for s, _ in board[key]] == [1, 2, 3]
        assert [v for _, v in board[key]] == pytest.approx([r[key] for r in rows], rel=1e-6)  # TensorBoard keeps float32

    history = wandb_history(run_dir)
    assert sorted(history) == [1, 2, 3]
    for r in rows:
        assert history[r["round"]] == pytest.approx(numbers(r), rel=1e-12)
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    track = json.loads((run_dir / "track.json").read_text())
    assert run.run_id == track["wandb"]["id"] and run.project == "fedlora" and run.display_name == "tracked"
    config = {item_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["fed"]["method"] == "fedex" and config["model"]["rank"] == 4
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({item_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert final["final.accuracy"] == pytest.approx(summary["final"]["accuracy"], rel=1e-12)

    run_id = track["mlflow"]["run_id"]
    assert mlflow_history(out, run_id, "eval_accuracy") == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-12)) for r in rows]
    from mlflow.tracking import MlflowClient

    stored = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "tracked"
    assert stored.data.params["fed.method"] == "fedex" and stored.data.params["model.rank"] == "4"
    assert stored.data.metrics["summary.best.accuracy"] == pytest.approx(summary["best"]["accuracy"], rel=1e-12)
    assert {name: track[name]["round"] for name in ("tensorboard", "wandb", "mlflow")} == {"tensorboard": 3, "wandb": 3, "mlflow": 3}


def test_a_resumed_run_sends_each_round_once_to_the_same_runs(tiny_models, tmp_path, offline):  # noqa: F811
    """Stopped after round 2's checkpoint (before its rows went out), then resumed: TensorBoard,
    W&B and MLflow each hold rounds 1, 2, 3 once, in the W&B and MLflow runs the first start made."""
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, track__to="tensorboard,wandb,mlflow", name="resumed"))
    original = Simulator.checkpoint

    def checkpoint_then_die(self, state):
        original(self, state)
        if state.round == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Simulator, "checkpoint", checkpoint_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, plots=False)
    run_dir = tmp_path / "resumed"
    first = json.loads((run_dir / "track.json").read_text())
    assert {name: first[name]["round"] for name in ("tensorboard", "wandb", "mlflow")} == {"tensorboard": 1, "wandb": 1, "mlflow": 1}

    run_experiment(cfg, plots=False)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    second = json.loads((run_dir / "track.json").read_text())
    assert second["wandb"]["id"] == first["wandb"]["id"] and second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    board = tensorboard_scalars(run_dir / "tensorboard")
    assert board["eval_accuracy"] == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in rows]
    assert mlflow_history(tmp_path, first["mlflow"]["run_id"], "train_loss") == [(r["round"], pytest.approx(r["train_loss"], rel=1e-12)) for r in rows]
    # Offline W&B cannot resume (each start writes a new offline-run folder, and syncing a later one
    # replaces the earlier): the newest folder holds every round, and the same run id.
    first_log, newest = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert sorted(wandb_history_of(first_log)) == [1] and sorted(wandb_history_of(newest)) == [1, 2, 3]
    assert {s: row["eval_accuracy"] for s, row in wandb_history_of(newest).items()} == {r["round"]: r["eval_accuracy"] for r in rows}
    assert newest.name == f"run-{first['wandb']['id']}.wandb"


def test_a_finished_run_started_again_leaves_its_trackers_alone(tiny_models, tmp_path, offline):  # noqa: F811
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, track__to="tensorboard,wandb,mlflow", name="again"))
    run_experiment(cfg, plots=False)
    run_dir = tmp_path / "again"
    track = json.loads((run_dir / "track.json").read_text())
    assert all(track[name]["finished"] for name in ("tensorboard", "wandb", "mlflow"))
    before = (sorted(run_dir.rglob("*")), mlflow_history(tmp_path, track["mlflow"]["run_id"], "summary.final.accuracy"))
    run_experiment(cfg, plots=False)
    assert (sorted(run_dir.rglob("*")), mlflow_history(tmp_path, track["mlflow"]["run_id"], "summary.final.accuracy")) == before
    assert len(before[1]) == 1


def test_a_tracker_that_cannot_start_leaves_a_finished_run_whole(tiny_models, tmp_path, offline, monkeypatch, capsys):  # noqa: F811
    """A finished run started again with a tracker whose store is unreachable: one-line error, exit 2,
    and its summary.json (what `fedlora compare` takes as a finished cell) still there."""
    args = ["run", *overrides(tiny_models["bert"], tmp_path, name="kept")]
    assert cli.main(args) == 0
    run_dir = tmp_path / "kept"
    assert not (run_dir / "track.json").exists()  # no track.to, no tracker file
    summary = (run_dir / "summary.json").read_text()
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}")
    capsys.readouterr()
    code = cli.main([*args, "track.to=mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedlora: error: track.to: mlflow could not start:") and len(err.splitlines()) == 1
    assert (run_dir / "summary.json").read_text() == summary


def _start_mlflow_tracker(run_dir: str) -> str:
    from fedlora.report.tracking import MlflowTracker

    tracker = MlflowTracker(Path(run_dir), {"fed": {"method": "fedit"}}, "fedlora", {})
    tracker.finish({"rounds": 1.0})
    return tracker.run_id


def test_parallel_workers_share_one_new_mlflow_store(tmp_path, monkeypatch):
    """`fedlora compare --jobs N` starts N runs at once on one new <output_dir>/mlflow.db: every one
    gets its own MLflow run in the one experiment (their starts race to create the tables)."""
    import multiprocessing

    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cells = [str(tmp_path / f"cell{i}") for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_start_mlflow_tracker, cells)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids) and len(set(ids)) == 4
    assert sorted(r.info.run_name for r in runs) == ["cell0", "cell1", "cell2", "cell3"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("track.to=tensorboard,neptune",), "track.to names 'neptune': the trackers are tensorboard, wandb, mlflow"),
        (("track.to=wandb,wandb",), "track.to names a tracker twice"),
        (("track.project='  '",), "track.project must not be empty"),
        (("track.to=wandb", "track.project=team/sst2"), "track.project='team/sst2': a W&B project name cannot hold / \\ # ? % or :"),
    ],
)
def test_bad_tracker_settings_are_refused_before_any_file(tiny_models, tmp_path, capsys, setting, message):  # noqa: F811
    out = tmp_path / "runs"
    code = cli.main(["run", *overrides(tiny_models["bert"], out), *setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedlora: error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_tracker_whose_package_is_missing_is_refused_before_any_file(tiny_models, tmp_path, capsys, monkeypatch):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "runs"
    code = cli.main(["run", *overrides(tiny_models["bert"], out), "track.to=mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "track.to=mlflow needs mlflow-skinny: pip install mlflow-skinny" in err
    assert not out.exists()


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_finishes(tiny_models, tmp_path, offline, monkeypatch, caplog):  # noqa: F811
    from fedlora.report import tracking

    def broken(self, step, metrics):
        if step == 2:
            raise ConnectionError("server went away")
        return real(self, step, metrics)

    real = tracking.MlflowTracker.log
    monkeypatch.setattr(tracking.MlflowTracker, "log", broken)
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, track__to="tensorboard,mlflow", name="flaky"))
    summary = run_experiment(cfg, plots=False)
    assert summary["rounds"] == 3
    assert "track.to: mlflow failed (ConnectionError: server went away); the run goes on without it" in caplog.text
    track = json.loads((tmp_path / "flaky" / "track.json").read_text())
    assert track["tensorboard"]["round"] == 3 and track["mlflow"]["round"] == 1
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(track["mlflow"]["run_id"]).info.status == "FAILED"  # closed when dropped
    assert [s for s, _ in tensorboard_scalars(tmp_path / "flaky" / "tensorboard")["eval_accuracy"]] == [1, 2, 3]


def test_on_flower_the_server_app_tracks_from_the_run_config(tiny_models, tmp_path):  # noqa: F811
    """`flwr run . --run-config "track.to='tensorboard'"`: the ServerApp's run folder gets the event
    files, one point per round as in its metrics.jsonl (the run config carries the list as a string)."""
    from flower_support import LocalGrid
    from flwr.app import Context, RecordDict

    from fedlora.flower import client_app as client_module
    from fedlora.flower.run_config import run_config_entries
    from fedlora.flower.server_app import main

    run_config = {**run_config_entries(load_config(None, overrides(tiny_models["bert"], tmp_path, name="flower"))), "track.to": "tensorboard"}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    main(LocalGrid(client_module.app, run_config, 3), context)
    rows = read_jsonl(tmp_path / "flower" / "metrics.jsonl")
    board = tensorboard_scalars(tmp_path / "flower" / "tensorboard")
    assert board["eval_accuracy"] == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in rows] and len(rows) == 3
    assert json.loads((tmp_path / "flower" / "track.json").read_text())["tensorboard"] == {"round": 3, "finished": True}


def test_a_project_name_w_and_b_cannot_hold_is_fine_for_mlflow(tiny_models, tmp_path):  # noqa: F811
    cfg = load_config(None, [*overrides(tiny_models["bert"], tmp_path), "track.to=mlflow", "track.project=team/sst2"])
    assert cfg.track.project == "team/sst2"
