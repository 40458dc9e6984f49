"""EdgeLAM on Flower (``flwr``, the ``scale`` extra): the run in a ServerApp, client trips on SuperNodes.

``records.py`` carries a trip's work and result as Flower records; ``app.py`` holds the ServerApp,
the ClientApp and the ``FlowerExecutor``; ``edgelam flower`` (``cli_flower.py``) writes an app folder
or runs one on local processes.
"""
