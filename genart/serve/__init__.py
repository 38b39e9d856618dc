"""Serving on Ray Serve: a FastAPI ingress, batched model deployments, multiplexed styles and a playground page.

Entry points: `genart serve` (genart.serve.run) and the app builder `genart.serve.app:build` for `serve deploy`.
"""
