"""Engines that run the federated round loop's clients somewhere else than in-process.

fedsec.engine.flower: Flower's ServerApp and ClientApp (pip install 'fedsec[flower]').
fedsec.engine.deploy: a local Flower deployment on 127.0.0.1 and `run_on_flower`.
"""
