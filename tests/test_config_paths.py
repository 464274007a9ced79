"""The path rule of `load_config`: paths written in a config file are relative to the file's
folder, command-line overrides and defaults (and ``output_dir`` always) to the working folder;
every path comes out absolute, so a run's ``config.yaml`` loads back equal from anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fedlora.config import RunConfig, config_from_dict, config_to_dict, load_config


@pytest.fixture
def layout(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(config file in tmp/project/configs, an unrelated working folder tmp/elsewhere)."""
    configs, elsewhere = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    configs.mkdir(parents=True)
    elsewhere.mkdir()
    (tmp_path / "project" / "models" / "bert").mkdir(parents=True)
    path = configs / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "model": {"name": "../models/bert"},
                "data": {
                    "data_dir": "../glue",
                    "train_file": "data/train.csv",
                    "eval_file": "./dev.csv",
                },
            }
        )
    )
    monkeypatch.chdir(elsewhere)
    return path, elsewhere


def test_file_paths_are_relative_to_the_file(layout):
    path, elsewhere = layout
    project = path.parent.parent
    cfg = load_config(path)
    assert cfg.data.data_dir == str(project / "glue")
    assert cfg.data.train_file == str(project / "configs" / "data" / "train.csv")
    assert cfg.data.eval_file == str(project / "configs" / "dev.csv")
    assert cfg.model.name == str(project / "models" / "bert")
    # output_dir: always the working folder
    assert cfg.output_dir == str(elsewhere / "out")


def test_overrides_and_defaults_are_relative_to_the_working_folder(layout):
    path, elsewhere = layout
    cfg = load_config(path, ["data.data_dir=my-glue", "model.name=./tiny", "output_dir=../runs"])
    assert cfg.data.data_dir == str(elsewhere / "my-glue")
    assert cfg.model.name == str(elsewhere / "tiny")
    assert cfg.output_dir == str(elsewhere.parent / "runs")
    # the file's own path, not overridden
    assert cfg.data.train_file == str(path.parent / "data" / "train.csv")

    default = load_config(None)
    glue = elsewhere.parent / "shared" / "data" / "glue"  # ../shared/data/glue
    assert default.data.data_dir == str(glue)
    assert default.output_dir == str(elsewhere / "runs")
    assert default.data.train_file == default.data.eval_file == ""  # empty stays
    assert default.data.source == "auto"


def test_the_same_config_from_any_working_folder(layout, monkeypatch):
    path, elsewhere = layout
    here = load_config(path, ["output_dir=/abs/runs"])
    monkeypatch.chdir(path.parent)
    assert load_config(path, ["output_dir=/abs/runs"]) == here
    monkeypatch.chdir(elsewhere)
    assert load_config(os.path.relpath(path), ["output_dir=/abs/runs"]) == here
    # a run's config.yaml (absolute paths) loads back equal wherever it lies
    copy = elsewhere / "deep" / "folder" / "config.yaml"
    copy.parent.mkdir(parents=True)
    copy.write_text(yaml.safe_dump(config_to_dict(here)))
    assert load_config(copy) == here


@pytest.mark.parametrize("name", ["minilm", "roberta-base", "FacebookAI/roberta-base", "no-such-org/model"])
def test_short_names_and_hub_ids_stay(layout, name):
    path, _ = layout
    assert load_config(path, [f"model.name={name}"]).model.name == name
    path.write_text(yaml.safe_dump({"model": {"name": name}}))
    assert load_config(path).model.name == name


def test_model_folder_with_a_slash_and_home(layout, monkeypatch, tmp_path):
    path, _ = layout
    path.write_text(yaml.safe_dump({"model": {"name": "sub/bert"}}))
    # no such folder beside the file: a hub id
    assert load_config(path).model.name == "sub/bert"
    (path.parent / "sub" / "bert").mkdir(parents=True)
    assert load_config(path).model.name == str(path.parent / "sub" / "bert")
    monkeypatch.setenv("HOME", str(tmp_path))
    path.write_text(yaml.safe_dump({"data": {"data_dir": "~/glue"}}))
    assert load_config(path).data.data_dir == str(tmp_path / "glue")


def test_flower_configs_keep_paths_as_given():
    """Flower's apps build configs from a mapping in their own working folders."""
    cfg = config_from_dict({"data": {"data_dir": "rel/glue"}})
    assert cfg.data.data_dir == "rel/glue" and cfg.output_dir == RunConfig().output_dir
