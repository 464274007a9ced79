"""fedlora on Flower (Message API): the same rounds across processes and machines.

* ``strategy.FedLoraStrategy``: a Flower Strategy around fedlora's shared round
  server (plan → per-client messages → finish), any aggregation method.
* ``client_app.app``: the ClientApp; trains with ``engine.client.run_client``.
* ``server_app.app``: the ServerApp; writes the same run folder as ``fedlora run``.
* ``records``: payloads ⇄ Flower records (float32 arrays, never pickled).
* ``run_config``: ``[tool.flwr.app.config]`` / ``--run-config`` ⇄ RunConfig.

Imported on demand, so the rest of fedlora works without flwr installed.
"""
