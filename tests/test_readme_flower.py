"""README's "Across machines with Flower", command by command, as a user runs it.

Each ```bash block of that section is marked ``<!-- flower: NAME -->``; these tests run the
blocks as written, in ``bash``, from a copy of this repository with ``shared/`` beside it
(a fresh checkout), after the section's ``setup`` block, with ``FLWR_HOME`` in a temporary
folder. What differs from a user's run, and only that: a tiny model and budget added at the
end of the command's ``--run-config`` (not as a second ``--run-config``: flwr 1.42 then drops
the first one's keys of the same section), the local SuperLink's ports
moved by Flower's own environment variables (so a developer's own SuperLink is left alone),
and ``SUPERLINK_HOST``/``PARTITION`` set as the README tells each machine to.

* the Simulation Engine through the default ``local`` connection: a tiny BERT, whose result
  equals an in-process run of the same config; a bad run (one error line, no folder); a tiny
  Llama on SST-2 as label-word prompts; then README's command stops the background SuperLink;
* the insecure one-machine trial, with a SuperNode killed mid-run and restarted (it comes back
  under a new node id and takes over its partition);
* TLS with the README's certificate recipe, SuperNode authentication and node-local data, with
  a SuperNode killed mid-run and restarted (same node id: it is resent the base deltas it lost);
* the insecure trial with its SuperLink killed mid-run, everything restarted and the run
  resumed (equal to an uninterrupted run), and with messages of 300 MB per node.

Every wait is bounded; every process started is stopped and checked to be gone.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from engine_support import GLUE, read_jsonl, tiny_models  # noqa: F401  (fixture)
from flower_processes import BIN, ROOT, free_port, pids_matching, port_is_free, processes, wait_for_port

from fedlora.engine import run_experiment
from fedlora.engine.checkpoint import load_checkpoint
from fedlora.flower.run_config import config_from_run_config, run_config_entries

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 420


def readme_blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- flower: (\S+) -->\n```bash\n(.*?)```", text, flags=re.S))
    assert {
        "setup",
        "simulation",
        "stop-local",
        "trial-superlink",
        "trial-supernodes",
        "trial-run",
        "certificates",
        "superlink",
        "connection",
        "trial-data",
        "keys",
        "register",
        "supernode",
        "run",
    } <= set(blocks)
    return blocks


BLOCKS = readme_blocks()


def tiny(model_dir: Path, **extra) -> str:
    """The tiny model and budget added to a README command's run config (later keys win)."""
    settings = {
        "model.name": f"'{model_dir}'",
        "model.rank": 4,
        "model.max_length": 64,
        "data.max_train_examples": 60,
        "data.max_eval_examples": 30,
        "train.batch_size": 8,
        "threads": 1,
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in settings.items())


def with_settings(command: str, settings: str) -> str:
    """``command`` with ``settings`` in its (last) ``--run-config "…"``: a key it already sets
    gets the new value in place (TOML refuses a key twice), the others are added at the end."""
    pair = r"(\S+?)=('[^']*'|\S+)"
    new = dict(re.findall(pair, settings))
    *_, last = re.finditer(r'--run-config "([^"]*)"', command)
    old = re.sub(pair, lambda m: f"{m[1]}={new.pop(m[1], m[2])}", last[1])
    return command[: last.start(1)] + " ".join([old, *(f"{k}={v}" for k, v in new.items())]) + command[last.end(1) :]


class Checkout:
    """A copy of the repository with ``shared/`` beside it, and how to run README blocks there."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "fedlora"
        shutil.copytree(ROOT / "src", self.dir / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md", ".gitignore"):
            shutil.copy(ROOT / name, self.dir / name)
        (tmp_path / "shared").symlink_to(GLUE.parents[1], target_is_directory=True)
        self.home = tmp_path / "flwr-home"
        self.env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("FLWR_")}
        self.env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{BIN}:{self.env.get('PATH', '')}",
                # Flower's own knobs for the local SuperLink's ports: a developer's own one is left alone
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            }
        )

    def script(self, name: str, settings: str = "") -> list[str]:
        block = with_settings(BLOCKS[name], settings) if settings else BLOCKS[name]
        return ["bash", "-c", BLOCKS["setup"] + "set -euo pipefail\n" + block]

    def run(self, name: str, settings: str = "", timeout: float = 60, **env) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(self.script(name, settings), cwd=self.dir, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"README block {name!r} did not finish in {timeout} s:\n{e.stdout}\n{e.stderr}")
        assert done.returncode == 0, f"README block {name!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(read_jsonl(path)) >= n:
            return
        assert proc.poll() is None, f"flwr run ended before round {n}"
        time.sleep(0.5)
    pytest.fail(f"{path} did not reach {n} rounds in {timeout} s")


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"flwr run ended before {text!r} appeared in {path.name}"
        time.sleep(0.5)
    pytest.fail(f"{text!r} did not appear in {path} within {timeout} s")


def finish(proc: subprocess.Popen, procs, name: str) -> str:
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {RUN_TIMEOUT} s\n{procs.log_tail()}")
    log = (procs.logs / f"{name}.log").read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:] + procs.log_tail()
    return log


def require_ports(*ports: int) -> None:
    busy = [p for p in ports if not port_is_free(p)]
    assert not busy, f"README's Flower ports {busy} are taken on this machine: stop what listens there first"


def assert_equals_in_process(co: Checkout, block: str, settings: str, name: str, tmp_path: Path) -> tuple[dict, dict]:
    """README's command ``block`` with ``settings``, run again in this process: the Flower run
    ``runs/<name>`` and the in-process one end with the same adapters and per-round metrics.
    Returns both checkpoints."""
    from flwr.common.config import parse_config_args

    command = with_settings(BLOCKS[block], settings).replace("$PWD", str(co.dir))
    given = parse_config_args(re.findall(r'--run-config "([^"]*)"', command))
    run_experiment(config_from_run_config({**run_config_entries(), **given, "output_dir": str(tmp_path / "inproc")}), plots=False, export=False)
    flower, local = load_checkpoint(co.dir / "runs" / name / "checkpoint.pt"), load_checkpoint(tmp_path / "inproc" / name / "checkpoint.pt")
    for module, a in local["state"]["adapters"].items():
        for f in ("B", "A"):
            torch.testing.assert_close(flower["state"]["adapters"][module][f], a[f], atol=1e-5, rtol=1e-4)
    for fr, lr in zip(flower["rounds"], local["rounds"], strict=True):
        assert fr["eval_accuracy"] == lr["eval_accuracy"] and fr["train_tokens"] == lr["train_tokens"]
    return flower, local


# --------------------------------------------------------------------------- simulation
def test_simulation_as_in_readme_equals_in_process_and_its_superlink_stops(tiny_models, tmp_path):
    co = Checkout(tmp_path)
    model = tiny_models["bert"]
    with processes(co.env, tmp_path) as procs:
        try:
            out = co.run("simulation", tiny(model, **{"fed.rounds": 2, "name": "'readme-sim'"}), timeout=RUN_TIMEOUT)
            # Bad input through Flower: 10 SuperNodes, 3 partitions. One line naming the problem,
            # no traceback of fedlora's own, no run folder (flwr run itself exits 0: Flower's rule).
            bad = co.run("simulation", tiny(model, **{"partition.num_clients": 3, "name": "'readme-bad'"}), timeout=RUN_TIMEOUT)
            # A causal LM through the same Simulation Engine: a tiny Llama on SST-2 as label-word prompts.
            from fedlora.models import tiny_causal_lm

            llama, tok = tiny_causal_lm("llama")
            llama.save_pretrained(tmp_path / "tiny-llama")
            tok.save_pretrained(tmp_path / "tiny-llama")
            co.run(
                "simulation", tiny(tmp_path / "tiny-llama", **{"fed.rounds": 1, "data.as_prompt": "true", "name": "'readme-sim-llama'"}), timeout=RUN_TIMEOUT
            )
        finally:
            co.run("stop-local")
        bad_text = bad.stdout + bad.stderr
        assert "fedlora: error: node" in bad_text and "the run has partition.num_clients=3" in bad_text, bad_text[-3000:]
        assert not (co.dir / "runs" / "readme-bad").exists()
        text = out.stdout + out.stderr
        assert "fedlora: round 2/2: 10 clients" in text and "Aggregated ClientApp-side Train Metrics" not in text
        link = f"{co.home}/local-superlink"
        deadline = time.monotonic() + 15
        while pids_matching(link) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pids_matching(link) == [], "README's stop command left the background SuperLink running"
    assert procs.alive_groups() == []
    (llama_row,) = read_jsonl(co.dir / "runs" / "readme-sim-llama" / "metrics.jsonl")
    assert llama_row["clients"] == 10 and {"eval_accuracy", "eval_loss", "eval_perplexity"} <= set(llama_row)
    run = co.dir / "runs" / "readme-sim"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 10 and r["dropped"] == 0 for r in rows)
    assert (run / "adapter" / "adapter_config.json").is_file()

    # The same config in this process: the same adapters and metrics.
    flower, local = assert_equals_in_process(co, "simulation", tiny(model, **{"fed.rounds": 2, "name": "'readme-sim'"}), "readme-sim", tmp_path)
    for fr, lr in zip(flower["rounds"], local["rounds"], strict=True):
        assert abs(fr["train_loss"] - lr["train_loss"]) < 1e-4


# --------------------------------------------------------------------------- deployment
def check_rejoined(run: Path, rounds: int) -> list[dict]:
    """Every round ran; the killed node's client trained again in the last rounds, undropped."""
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    clients = read_jsonl(run / "clients.jsonl")
    last = [c for c in clients if c["round"] == rounds]
    assert sorted(c["client"] for c in last) == ["client0", "client1"] and not any("dropped" in c for c in last), last
    assert rows[-1]["clients"] == 2 and rows[-1]["dropped"] == 0
    assert json.loads((run / "summary.json").read_text())["rounds"] == rounds
    return clients


def test_insecure_trial_as_in_readme_a_killed_supernode_comes_back(tiny_models, tmp_path):
    require_ports(9093, 9094, 9095)
    co = Checkout(tmp_path)
    rounds = 6
    with processes(co.env, tmp_path) as procs:
        procs.start("superlink", co.script("trial-superlink"), cwd=co.dir)
        wait_for_port(9093)
        procs.start("supernodes", co.script("trial-supernodes"), cwd=co.dir)
        run = procs.start(
            "flwr-run",
            co.script("trial-run", tiny(tiny_models["bert"], **{"fed.rounds": rounds, "fed.client_timeout": 60, "name": "'readme-trial'"})),
            cwd=co.dir,
        )
        out = co.dir / "runs" / "readme-trial"
        wait_for_rows(out / "metrics.jsonl", 2, run, RUN_TIMEOUT)
        # Crash node 1 (SIGKILL: no goodbye to the SuperLink), then restart it with README's line.
        (node1,) = [line for line in BLOCKS["trial-supernodes"].splitlines() if "partition-id=1" in line]
        for pid in pids_matching("partition-id=1 num-partitions=2"):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        procs.start("supernode1-again", ["bash", "-c", BLOCKS["setup"] + node1.rstrip(" &") + "\n"], cwd=co.dir)
        log = finish(run, procs, "flwr-run")
        assert "joins in place of node" in log
    assert procs.alive_groups() == []
    check_rejoined(out, rounds)


def test_tls_authenticated_nodes_with_their_own_data_as_in_readme_a_killed_supernode_comes_back(tiny_models, tmp_path):
    require_ports(9093, 9094, 9095)
    co = Checkout(tmp_path)
    host = {"SUPERLINK_HOST": "localhost"}
    rounds = 6
    co.run("certificates", **host)
    co.run("trial-data")
    with processes(co.env, tmp_path) as procs:
        procs.start("superlink", co.script("superlink"), cwd=co.dir, env={**co.env, **host})
        wait_for_port(9093)
        co.run("connection", **host)
        for i in (0, 1):
            co.run("keys", PARTITION=str(i))
            co.run("register", PARTITION=str(i), timeout=60)
            procs.start(f"supernode{i}", co.script("supernode"), cwd=co.dir, env={**co.env, **host, "PARTITION": str(i)})
        # An unregistered node (its own new key) is not admitted and cannot join the run.
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(co.dir / "keys" / "intruder")], check=True)
        procs.start(
            "intruder",
            [
                "bash",
                "-c",
                BLOCKS["setup"]
                + BLOCKS["supernode"].replace("keys/node$PARTITION", "keys/intruder").replace("--port $((9094 + PARTITION))", f"--port {free_port()}"),
            ],
            cwd=co.dir,
            env={**co.env, **host, "PARTITION": "1"},
        )
        run = procs.start(
            "flwr-run",
            co.script("run", tiny(tiny_models["bert"], **{"fed.rounds": rounds, "fed.client_timeout": 60, "name": "'readme-tls'"})),
            cwd=co.dir,
            env={**co.env, **host},
        )
        out = co.dir / "runs" / "readme-tls"
        wait_for_rows(out / "metrics.jsonl", 2, run, RUN_TIMEOUT)
        procs.kill("supernode1")  # a crash: SIGKILL to the node and its ClientApps
        # The SuperLink admits the same key again once it has marked the crashed session offline
        # (README says so); the round that was waiting for it records the SuperLink's reason.
        wait_for_text(tmp_path / "flwr-run.log", "client1 dropped: node", run, 180)
        procs.start("supernode1-again", co.script("supernode"), cwd=co.dir, env={**co.env, **host, "PARTITION": "1"})
        log = finish(run, procs, "flwr-run")
        # same node id, state lost: resent every base delta (as the rounds it lacks, or as the snapshot of every
        # round where the history was pruned past what it held)
        assert "has folded only through round" in log or "is sent the snapshot of rounds 1.." in log
    assert procs.alive_groups() == []
    clients = check_rejoined(out, rounds)
    # Node-local data: each hospital trained on its own 500 rows, weighted by them; the server (data.node_data=true)
    # read no training set, so it has no label histogram of the clients to write.
    assert {c["examples"] for c in clients if "dropped" not in c} == {500}
    assert not (out / "label_histogram.csv").exists() and (out / "metrics.jsonl").is_file()
    # The unregistered key was refused at activation and never joined.
    assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text(errors="replace")
    assert {c["client"] for c in clients} == {"client0", "client1"}


def test_insecure_trial_carries_messages_of_hundreds_of_mb_intact(tmp_path):
    """Large messages: a base model of width 4096 with rank-768 LoRA on query, key and value of
    two layers (what a LLaMA-7B-scale exact download weighs: FedEx's residual travels as
    (K−1)·r columns of factors beside the new adapters), through README's insecure trial, so every array passes
    Flower's chunking between ServerApp, SuperLink, SuperNodes and ClientApps. Round 2 sends
    each node about 300 MB; the result must equal an in-process run of the same config to
    float32 round-off (an array cut or reordered in transit would not)."""
    import transformers as tf

    from fedlora.models import tiny_model

    require_ports(9093, 9094, 9095)
    _, tok = tiny_model("bert")
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        hidden_size=4096, num_hidden_layers=2, num_attention_heads=16, intermediate_size=64, max_position_embeddings=64, vocab_size=tok.vocab_size
    )
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "wide-bert")
    tok.save_pretrained(tmp_path / "wide-bert")
    wide = {"model.rank": 768, "model.target_modules": "'query,key,value'", "model.max_length": 16, "data.max_train_examples": 40, "data.max_eval_examples": 8}
    settings = tiny(
        tmp_path / "wide-bert", **wide, **{"train.steps": 1, "train.batch_size": 2, "fed.rounds": 2, "fed.client_timeout": 300, "name": "'readme-wide'"}
    )
    co = Checkout(tmp_path)
    with processes(co.env, tmp_path) as procs:
        procs.start("superlink", co.script("trial-superlink"), cwd=co.dir)
        wait_for_port(9093)
        procs.start("supernodes", co.script("trial-supernodes"), cwd=co.dir)
        run = procs.start("flwr-run", co.script("trial-run", settings), cwd=co.dir)
        finish(run, procs, "flwr-run")
    assert procs.alive_groups() == []
    out = co.dir / "runs" / "readme-wide"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["clients"] for r in rows] == [2, 2] and all(r["dropped"] == 0 for r in rows)
    assert rows[1]["bytes_down"] / 2 > 250e6, rows[1]["bytes_down"]  # per node, round 2: hundreds of MB

    flower, local = assert_equals_in_process(co, "trial-run", settings, "readme-wide", tmp_path)
    assert len(local["state"]["adapters"]) == 6
    assert [r["bytes_down"] for r in flower["rounds"]] == [r["bytes_down"] for r in local["rounds"]]


def test_insecure_trial_superlink_killed_mid_run_then_run_again_equals_uninterrupted(tiny_models, tmp_path):
    """Chaos on the Deployment Engine: the SuperLink (and the ServerApp it started) is killed
    with SIGKILL after round 2. Its node registry lived in its memory, so the SuperNodes it
    knew are refused by the new one (401) and exit: README's SuperLink and SuperNode commands
    start them again, and README's `flwr run` with the same config resumes the run folder
    from its last checkpoint. FedEx (a base delta every round, which the nodes' new ClientApps
    must receive as one snapshot): the result equals an uninterrupted in-process run."""
    require_ports(9093, 9094, 9095)
    co = Checkout(tmp_path)
    rounds = 4
    settings = tiny(tiny_models["bert"], **{"fed.rounds": rounds, "fed.client_timeout": 120, "name": "'readme-chaos'"})
    out = co.dir / "runs" / "readme-chaos"
    with processes(co.env, tmp_path) as procs:
        procs.start("superlink", co.script("trial-superlink"), cwd=co.dir)
        wait_for_port(9093)
        procs.start("supernodes", co.script("trial-supernodes"), cwd=co.dir)
        run = procs.start("flwr-run", co.script("trial-run", settings), cwd=co.dir)
        wait_for_rows(out / "metrics.jsonl", 2, run, RUN_TIMEOUT)
        procs.kill("superlink")  # SIGKILL to the SuperLink's process group: its ServerApp dies with it
        for pid in pids_matching("flwr-serverapp"):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        run.wait(timeout=60)
        done = len(read_jsonl(out / "metrics.jsonl"))
        assert done < rounds, "the kill came too late to test a resume"
        procs.kill("supernodes")
        procs.start("superlink-again", co.script("trial-superlink"), cwd=co.dir)
        wait_for_port(9093)
        procs.start("supernodes-again", co.script("trial-supernodes"), cwd=co.dir)
        # README's run command again; its connection is already in config.toml (a second
        # append would make the file invalid), so only the `flwr run` line of the block.
        (line,) = [x for x in BLOCKS["trial-run"].splitlines() if x.startswith("flwr run")]
        again = procs.start("flwr-run-again", ["bash", "-c", BLOCKS["setup"] + with_settings(line, settings) + "\n"], cwd=co.dir)
        log = finish(again, procs, "flwr-run-again")
        assert f"resumed after round {done}" in log or f"round {done + 1}/{rounds}" in log, log[-3000:]
    assert procs.alive_groups() == []
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)) and all(r["clients"] == 2 and r["dropped"] == 0 for r in rows)

    assert_equals_in_process(co, "trial-run", settings, "readme-chaos", tmp_path)
