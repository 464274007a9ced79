"""``flwr run .`` on Flower's two engines, with real processes on 127.0.0.1:

* Simulation Engine: a SuperLink with the simulation runtime (Ray backend),
  3 virtual SuperNodes.
* Deployment Engine: a SuperLink and two SuperNodes started here (insecure,
  then TLS with certificates this test makes), 2 rounds.

Both pass fedlora keys through ``--run-config``; the run folder the ServerApp
writes is checked against what the config asks for, and every process started
is stopped (bounded waits everywhere).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess

import pytest
import torch

from engine_support import GLUE, tiny_models  # noqa: F401  (fixture)
from fedlora.engine import run_experiment
from fedlora.engine.checkpoint import load_checkpoint
from fedlora.flower.run_config import config_from_run_config
from flower_processes import ROOT, flower_env, free_port, processes, run_config_arg, tool

RUN_TIMEOUT = 420


def settings(model_dir, out, clients: int, method: str) -> dict:
    return {
        "model.name": str(model_dir), "model.rank": 4, "model.max_length": 64,
        "data.data_dir": str(GLUE), "data.max_train_examples": 60, "data.max_eval_examples": 30,
        "partition.num_clients": clients, "partition.scheme": "dirichlet", "partition.alpha": 0.5,
        "fed.rounds": 2, "fed.method": method, "fed.client_timeout": 300.0,
        "train.batch_size": 8, "threads": 1, "output_dir": str(out), "name": "flower-run",
    }


def write_connection(home, name: str, port: int, *, extra: str = "", insecure: bool = True) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n'
        + ("insecure = true\n" if insecure else "") + extra)


def flwr_run(env, connection: str, run_settings: dict, procs) -> None:
    try:
        done = subprocess.run([tool("flwr"), "run", ".", connection, "--stream", "--run-config", run_config_arg(run_settings)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"flwr run did not finish in {RUN_TIMEOUT} s\n{e.stdout}\n{procs.log_tail()}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + procs.log_tail()


def check_run_folder(out, clients: int, method: str) -> None:
    run = out / "flower-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == clients and r["dropped"] == 0 and "eval_accuracy" in r for r in rows)
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_simulation_engine_equals_in_process(tiny_models, tmp_path):
    port, home, out = free_port(), tmp_path / "flwr-home", tmp_path / "out"
    write_connection(home, "sim", port, extra="options.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 1\n")
    env = flower_env(home)
    run_settings = settings(tiny_models["bert"], out, 3, "hexa")
    with processes(env, tmp_path) as procs:
        procs.start("superlink", [tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                                  "--disable-runtime-dependency-installation"])
        flwr_run(env, "sim", run_settings, procs)
    assert procs.alive_groups() == []
    check_run_folder(out, 3, "hexa")

    # The same config in this process, on the in-process engine: same adapters and metrics.
    cfg = config_from_run_config({**run_settings, "output_dir": str(tmp_path / "inproc")})
    run_experiment(cfg, plots=False, export=False)
    flower = load_checkpoint(out / "flower-run" / "checkpoint.pt")
    local = load_checkpoint(tmp_path / "inproc" / "flower-run" / "checkpoint.pt")
    for name, a in local["state"]["adapters"].items():
        for f in ("B", "A"):
            torch.testing.assert_close(flower["state"]["adapters"][name][f], a[f], atol=1e-5, rtol=1e-4)
    for fr, lr in zip(flower["rounds"], local["rounds"], strict=True):
        assert fr["eval_accuracy"] == lr["eval_accuracy"] and fr["train_tokens"] == lr["train_tokens"]
        assert abs(fr["train_loss"] - lr["train_loss"]) < 1e-4


def make_certificates(d):
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return d / "ca.crt", d / "server.pem", d / "server.key"


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_deployment_engine(tiny_models, tmp_path, tls):
    port, home, out = free_port(), tmp_path / "flwr-home", tmp_path / "out"
    if tls:
        ca, cert, key = make_certificates(tmp_path)
        link_sec = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        node_sec = ["--root-certificates", str(ca)]
        write_connection(home, "deploy", port, extra=f'root-certificates = "{ca}"\n', insecure=False)
    else:
        link_sec, node_sec = ["--insecure"], ["--insecure"]
        write_connection(home, "deploy", port)
    env = flower_env(home)
    with processes(env, tmp_path) as procs:
        procs.start("superlink", [tool("flower-superlink"), *link_sec, "--host", "127.0.0.1", "--port", str(port),
                                  "--disable-runtime-dependency-installation"])
        for i in range(2):
            procs.start(f"supernode{i}", [tool("flower-supernode"), *node_sec, "--superlink", f"127.0.0.1:{port}",
                                          "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"])
        flwr_run(env, "deploy", settings(tiny_models["bert"], out, 2, "fedex"), procs)
    assert procs.alive_groups() == []
    check_run_folder(out, 2, "fedex")
