"""Train candidate generators, pick the best checkpoint by an evaluation metric, and deploy or update the Serve app.

    python workflows/train_then_deploy.py                        # after `make quickstart`: its data and critic
    genart submit -- python workflows/train_then_deploy.py --config my.yaml --out s3://bucket/genart/deploy

Steps: train one run per candidate (a list of `--set` overrides; a rerun resumes) -> evaluate every kept
checkpoint (and the checkpoint being served now, if any) with `genart evaluate` on the same features, seeds and
real images -> deploy the winner, only if it beats what is serving -> smoke-test the live endpoint.
On a cluster the app keeps running after this script ends; on the embedded local Ray it serves until Ctrl-C.
Writes selection.json (every metric value), serve.yaml (for `serve deploy`) and deployed.png (a grid from the endpoint).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Literal

import click
from pydantic import Field, field_validator, model_validator

from genart import config, runtime, storage, workflow
from genart.errors import UserError
from genart.models import generative_families
from genart.train.config import check_run_name
from genart.workflow import Workflow

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATORS = generative_families()  # families that sample from seeds: what FID/KID/precision/recall measure


class Candidate(config.Section):
    name: str  # run folder name under `runs`
    set: list[str] = []  # training --set overrides that make this candidate, e.g. ["model.lr_g=0.0001"]

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_run_name(value)


class Selection(config.Section):
    # A `genart evaluate` metric name, which carries num_generated and the features (genart.evaluate.registry):
    # fid1k_inception, kid1k_critic (lower is better), pr1k_k3_critic_precision / _recall (higher is better), ...
    metric: str = "fid1k_inception"
    features: str = "inception"  # inception[:WEIGHTS] or critic:RUN_OR_CHECKPOINT (see `genart evaluate --help`)
    num_generated: int = Field(1000, ge=2)  # images generated per checkpoint (same seeds for every checkpoint)
    renamed = {"num_samples": "num_generated"}  # the old name of num_generated still loads
    split: str = "val"  # real images compared against
    max_real: int | None = Field(None, ge=2)  # cap on real images (None = the whole split)

    @model_validator(mode="after")
    def _known_metric(self):
        if not self.better:
            from genart.evaluate import metric_keys, parse_features

            names = [n for n in metric_keys(parse_features(self.features).kind, self.num_generated)
                     if _direction(n, self)]
            raise ValueError(f"selection.metric {self.metric!r} is not a metric of num_generated={self.num_generated} on "
                             f"features={self.features}; use one of {', '.join(names)}")
        return self

    @property
    def better(self) -> Literal["min", "max"] | None:
        """Which way `metric` is better, from the registry; None when it is not a selectable metric here."""
        return _direction(self.metric, self)


def _direction(name: str, sel: Selection) -> Literal["min", "max"] | None:
    from genart.evaluate import parse_features
    from genart.evaluate.registry import Protocol, specs

    # precision/recall carry the rows per side: up to num_generated, fewer when the real split is smaller (which
    # check_selection knows once the data is there)
    rows = re.match(r"pr(\d+)(k?)_", name)
    num_real = int(rows.group(1)) * (1000 if rows.group(2) else 1) if rows else None
    output = specs(Protocol(parse_features(sel.features).kind, sel.num_generated, num_real=num_real)).get(name)
    return output.better if output else None


class Deploy(config.Section):
    model_name: str = "dcgan"  # the entry of the app's `models` that gets the winning checkpoint
    serve_config: str | None = None  # Serve config or app args to start from (keeps its other models); None = new app
    app_name: str = "genart"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens (0.0.0.0 on a cluster behind a firewall / LB)
    port: int = Field(8000, ge=1, le=65535)
    only_if_better: bool = True  # keep the served checkpoint unless the winner is better on the same metric


class Audit(config.Section):
    # `genart audit` of the winner before it is deployed: share of samples closer to a training image than the
    # dataset's own val images are (Somepalli et al. 2023). Over max_copy_share, the workflow refuses to deploy.
    enabled: bool = True
    max_copy_share: float = Field(0.05, ge=0.0, le=1.0)  # highest share of copied samples a deployable model may have
    num_generated: int = Field(256, ge=1)  # images generated and audited (seeds 0..N-1)
    renamed = {"num_samples": "num_generated"}  # the old name of num_generated still loads
    features: str | None = None  # embedding space; None = selection.features
    quantile: float = Field(0.99, ge=0.5, lt=1.0)  # a sample is a copy when closer than this share of val images


class TrainThenDeployConfig(config.Section):
    data: str = "results/quickstart/data/synth"  # prepared dataset: trained on and evaluated against
    train_config: str = "configs/dcgan.yaml"  # base training config (relative to workflows/)
    runs: str = "results/train_then_deploy/runs"  # run.storage of the candidates
    max_steps: int = Field(600, ge=1)
    num_workers: int = Field(2, ge=1)
    candidates: list[Candidate] = Field(default_factory=lambda: [Candidate(name="dcgan-a")], min_length=1)
    selection: Selection = Selection()
    deploy: Deploy = Deploy()
    audit: Audit = Audit()

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, candidates: list[Candidate]) -> list[Candidate]:
        names = [c.name for c in candidates]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:  # one name is one run folder: the second would resume (or be refused by) the first's run
            raise ValueError(f"candidate name {repeated!r} is used twice; give each candidate its own name")
        return candidates


# ---------------------------------------------------------------- train + evaluate


def train_candidates(cfg: TrainThenDeployConfig) -> dict[str, dict]:
    runs = {}
    for cand in cfg.candidates:
        settings = {"data.path": cfg.data, "run.storage": cfg.runs, "run.name": cand.name,
                    "train.max_steps": cfg.max_steps, "scaling.num_workers": cfg.num_workers}
        train_cfg = workflow.training_config(os.path.join(HERE, cfg.train_config), settings, cand.set)
        if train_cfg.model.family not in GENERATORS:
            raise UserError(f"train_config: model.family {train_cfg.model.family!r} is not a generator; use one of {', '.join(GENERATORS)}")
        click.echo(f"-- candidate {cand.name}: {' '.join(cand.set) or '(base config)'}")
        runs[cand.name] = workflow.train(train_cfg)
    return runs


def evaluate(checkpoint: str, cfg: TrainThenDeployConfig) -> float:
    """The selection metric of one checkpoint (same seeds, real images and features for all)."""
    from genart.evaluate import job

    sel = cfg.selection
    report = job.run(checkpoint, cfg.data, num=sel.num_generated, features=sel.features, split=sel.split,
                     max_real=sel.max_real)
    if sel.metric not in report["metrics"]:  # checked before training (check_selection); a changed dataset
        raise UserError(f"selection.metric {sel.metric}: not computed for {checkpoint}; it reported "
                        f"{', '.join(report['metrics'])}")
    return float(report["metrics"][sel.metric])


def check_selection(cfg: TrainThenDeployConfig) -> None:
    """selection.metric must be a name the evaluation will report on this data, before any candidate trains:
    precision/recall are named by the rows per side, fewer than num_generated when the real split is smaller."""
    from genart.evaluate import metric_keys, parse_features
    from genart.evaluate.reference import subset_rows

    sel = cfg.selection
    names = metric_keys(parse_features(sel.features).kind, sel.num_generated,
                        num_real=subset_rows(cfg.data, sel.split, sel.max_real))
    if sel.metric not in names:
        raise UserError(f"selection.metric {sel.metric!r}: the evaluation of {sel.num_generated} images against the "
                        f"{sel.split} split of {cfg.data} reports {', '.join(names)}")


def weights_hash(checkpoint: str) -> str:
    """What /v1/models reports as checkpoint_hash (the sha256 of the weights file)."""
    from genart.serve.app import model_card

    return model_card("candidate", checkpoint)["checkpoint_hash"]


def evaluated_with(cfg: TrainThenDeployConfig) -> dict:
    """Everything a metric value depends on besides the weights: values got with the same settings are reused. The
    features are named by their own weights too: a critic trained further since measures in another space."""
    from genart.evaluate.features import parse_features, weights_digest
    from genart.evaluate.reference import dataset_hash

    return {**cfg.selection.model_dump(mode="json"), "data": cfg.data, "dataset_hash": dataset_hash(cfg.data),
            "features_weights": weights_digest(parse_features(cfg.selection.features))}


def evaluate_all(cfg: TrainThenDeployConfig, runs: dict[str, dict], settings: dict, previous: dict,
                 serving: dict | None) -> list[dict]:
    """One row per kept checkpoint of every candidate (+ the served one), best first. A checkpoint evaluated by an
    earlier run with the same `settings` (and the same weights) keeps its value instead of being evaluated again."""
    from genart.train import outputs

    known = {(r["checkpoint"], r["checkpoint_hash"]): r["value"] for r in previous.get("rows", [])
             if previous.get("evaluated_with", previous.get("scored_with")) == settings}  # older runs wrote scored_with
    todo = [(name, storage.join(run["run_dir"], ckpt), step) for name, run in runs.items()
            for step, ckpt in outputs.list_checkpoints(run["run_dir"], complete=True)]
    pruned = None  # the served checkpoint, if keep_last has pruned it since it was deployed
    if serving and serving["checkpoint"] not in {uri for _, uri, _ in todo}:
        if not storage.exists(serving["checkpoint"]):
            pruned = serving["checkpoint"]
        if pruned is None or (pruned, serving["checkpoint_hash"]) in known:  # its recorded value still counts
            todo.append(("(serving now)", serving["checkpoint"], None))
        else:
            click.echo(f"note: the served {pruned} is gone from its run and was not evaluated with these settings; "
                       f"it cannot be compared, so the winner replaces it")
    rows = []
    for name, uri, step in todo:
        digest = serving["checkpoint_hash"] if uri == pruned else weights_hash(uri)
        value = known.get((uri, digest))
        if value is None:
            value = evaluate(uri, cfg)
        rows.append({"candidate": name, "checkpoint": uri, "checkpoint_hash": digest, "step": step, "value": value})
        reused = " (evaluated before)" if (uri, digest) in known else ""
        click.echo(f"  {name} {uri.rsplit('/', 1)[-1]}: {cfg.selection.metric} {value:.4g}{reused}")
    lower = cfg.selection.better == "min"
    return sorted(rows, key=lambda r: r["value"] if lower else -r["value"])


# ---------------------------------------------------------------- deploy


def audit_gate(cfg: TrainThenDeployConfig, checkpoint: str, out: str) -> dict:
    """Audit `checkpoint` for memorised training images; {"copy_share", "allowed", ...} (report in <out>/audit)."""
    from genart.search import audit as memorisation

    a = cfg.audit
    report = memorisation.audit(checkpoint, cfg.data, num=a.num_generated, features=a.features or cfg.selection.features,
                                quantile=a.quantile, out=storage.join(out, "audit"))
    click.echo(memorisation.summary(report))
    return {"checkpoint": checkpoint, "copy_share": report["copy_share"], "max_copy_share": a.max_copy_share,
            "allowed": report["copy_share"] <= a.max_copy_share, "report": storage.join(out, "audit", "summary.json")}



def _base_url(d: Deploy) -> str:
    host = "127.0.0.1" if d.host in ("0.0.0.0", "::") else d.host
    return f"http://{host}:{d.port}{d.route_prefix.rstrip('/')}"


def _request(d: Deploy, path: str, body: dict | None = None, api_key_env: str = "GENART_API_KEY", timeout: float = 60):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    req = urllib.request.Request(_base_url(d) + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def api_key_env(d: Deploy) -> str:
    """The variable holding the app's API key: the serve config's `api_key_env` (default GENART_API_KEY)."""
    from genart.serve.run import settings_from

    return settings_from(d.serve_config, models=(f"{d.model_name}=unused",)).api_key_env  # no checkpoint is read


def served_hash(d: Deploy, key_env: str, wait_s: float = 30) -> str | None:
    """checkpoint_hash of what the live app serves as `model_name`, or None when nothing answers there (no server,
    no such route or model). A refused API key is a UserError, and a server error is retried for `wait_s`: neither
    may pass for "nothing served", which would skip the only-if-better check and replace the live model.
    (The API never reveals server paths; the path comes from this workflow's own record, see `served`.)"""
    deadline = time.time() + wait_s
    while True:
        try:
            models = json.loads(_request(d, "/v1/models", api_key_env=key_env, timeout=5))["models"]
            break
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise UserError(f"{_base_url(d)}/v1/models refused the API key (HTTP {exc.code}): set ${key_env} to "
                                "the served app's key") from None
            if exc.code < 500:
                return None  # e.g. 404: no app at this route
            if time.time() > deadline:
                raise UserError(f"{_base_url(d)}/v1/models answers HTTP {exc.code}; see `serve status`") from None
            time.sleep(1)
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None
    return next((m.get("checkpoint_hash") for m in models if m.get("name") == d.model_name), None)


def served(d: Deploy, previous: dict) -> dict | None:
    """The live checkpoint as {"checkpoint", "checkpoint_hash"}: checkpoint is None when this workflow (with this
    --out) did not deploy it, so it cannot be evaluated and is replaced."""
    digest = served_hash(d, api_key_env(d))
    if digest is None:
        return None
    deployed = previous.get("deployed") or {}
    path = deployed.get("checkpoint") if deployed.get("checkpoint_hash") == digest else None
    return {"checkpoint": path, "checkpoint_hash": digest}


def serve_config_doc(d: Deploy, args: dict) -> dict:
    """A Serve config (`serve deploy serve.yaml`) equivalent to what this workflow deployed."""
    from genart.serve.run import IMPORT_PATH

    return {"http_options": {"host": d.host, "port": d.port},
            "applications": [{"name": d.app_name, "route_prefix": d.route_prefix, "import_path": IMPORT_PATH,
                              "args": args}]}


def deploy(cfg: TrainThenDeployConfig, winner: dict, out: str) -> dict:
    """Deploy (or update in place: Serve redeploys only what changed) and smoke-test the endpoint."""
    import yaml
    from ray import serve

    from genart.serve.app import build
    from genart.serve.run import settings_from, start_http

    d = cfg.deploy
    checkpoint, digest = winner["checkpoint"], winner["checkpoint_hash"]
    settings = settings_from(d.serve_config, models=(f"{d.model_name}={checkpoint}",))
    args = settings.model_dump(mode="json", exclude_defaults=True)
    storage.write_text(storage.join(out, "serve.yaml"), yaml.safe_dump(serve_config_doc(d, args), sort_keys=False))
    host, port = start_http(d.host, d.port, settings.request_timeout_s + 5, settings.access_log)
    if (host, port) != (d.host, d.port):  # HTTP options are cluster-wide: a running Serve keeps its own
        click.echo(f"note: Serve already listens on {host}:{port}; deploying there (deploy.host/port apply to a new Serve)")
        d = d.model_copy(update={"host": host, "port": port})
    serve.run(build(settings), name=d.app_name, route_prefix=d.route_prefix, blocking=False)
    deadline = time.time() + 300
    while served_hash(d, settings.api_key_env) != digest:  # an update: the old replicas answer until the new ones are up
        if time.time() > deadline:
            raise RuntimeError(f"{_base_url(d)}/v1/models does not show {checkpoint} after 300 s; see `serve status`")
        time.sleep(1)
    grid = _request(d, "/v1/generate", {"model": d.model_name, "n": 16, "seed": 0}, settings.api_key_env)
    storage.write_bytes(storage.join(out, "deployed.png"), grid)
    return {"url": _base_url(d) + "/", "checkpoint": checkpoint, "checkpoint_hash": digest, "smoke_test_png_bytes": len(grid)}


# ---------------------------------------------------------------- main


def run(config_path: str | None, out: str, overrides: tuple[str, ...] = (), address: str | None = None) -> dict:
    flow = Workflow("train_then_deploy", TrainThenDeployConfig)
    cfg = flow.load(config_path, overrides)
    flow.record(cfg, out)
    check_selection(cfg)
    runtime.init(address)
    with flow.step(f"train {len(cfg.candidates)} candidate(s)"):
        runs = train_candidates(cfg)
    selection_path = storage.join(out, "selection.json")
    previous = json.loads(storage.read_text(selection_path)) if storage.exists(selection_path) else {}
    serving = served(cfg.deploy, previous)
    settings = evaluated_with(cfg)
    with flow.step(f"evaluate checkpoints by {cfg.selection.metric} ({cfg.selection.features})"):
        gate = serving if cfg.deploy.only_if_better and serving and serving["checkpoint"] else None
        rows = evaluate_all(cfg, runs, settings, previous, gate)
    best = rows[0]
    if serving is None:
        decision = "deploy"
    else:
        decision = "keep" if serving["checkpoint_hash"] == best["checkpoint_hash"] else "update"
        if serving["checkpoint"] is None:
            click.echo(f"note: the served {cfg.deploy.model_name} (weights {serving['checkpoint_hash'][:12]}) was not "
                       f"deployed from {out}; it cannot be evaluated, so the winner replaces it")
    selection = {"metric": cfg.selection.metric, "features": cfg.selection.features, "evaluated_with": settings,
                 "winner": best, "serving_before": serving, "decision": decision, "rows": rows,
                 "deployed": previous.get("deployed")}  # what is live; replaced below only when a deploy happens
    if decision != "keep" and cfg.audit.enabled:
        with flow.step(f"audit {best['checkpoint']} for copied training images"):
            selection["audit"] = audit_gate(cfg, best["checkpoint"], out)
        if not selection["audit"]["allowed"]:
            selection["decision"] = "refused"
            storage.write_text(selection_path, json.dumps(selection, indent=2, default=str) + "\n")
            raise UserError(f"refusing to deploy {best['checkpoint']}: {selection['audit']['copy_share']:.1%} of its "
                            f"samples copy training images (audit.max_copy_share {cfg.audit.max_copy_share:.1%}); "
                            f"see {selection['audit']['report']}")
    if decision == "keep":
        click.echo(f"the served checkpoint {best['checkpoint']} still has the best {cfg.selection.metric}; nothing to deploy")
    else:
        with flow.step(f"{decision} {cfg.deploy.app_name}: {cfg.deploy.model_name} = {best['checkpoint']}"):
            selection["deployed"] = deploy(cfg, best, out)
    selection["timings_s"] = flow.timings
    storage.write_text(selection_path, json.dumps(selection, indent=2, default=str) + "\n")
    flow.done([f"winner:    {best['candidate']} {best['checkpoint']} ({cfg.selection.metric} {best['value']:.4g})",
               f"decision:  {decision}", f"endpoint:  {_base_url(cfg.deploy)}/",
               f"selection: {selection_path}", f"serve.yaml: {storage.join(out, 'serve.yaml')}"])
    return selection


@click.option("--out", default="results/train_then_deploy", show_default=True, help="Where selection.json, serve.yaml and deployed.png go.")
@click.option("--keep-serving/--no-keep-serving", default=None,
              help="Block serving until Ctrl-C after deploying [default: on the embedded local Ray, whose app ends with this process].")
@workflow.command("train_then_deploy", os.path.join(HERE, "train_then_deploy.yaml"), "max_steps=100")
def main(config_path: str, overrides: tuple[str, ...], address: str | None, out: str, keep_serving: bool | None) -> None:
    """Train candidates, pick the best checkpoint by a metric, and deploy or update the Serve app."""
    run(config_path, out if storage.is_s3(out) else os.path.abspath(out), overrides, address)
    if keep_serving if keep_serving is not None else not address:
        from genart.serve.run import wait_for_ctrl_c

        click.echo("serving until Ctrl-C")
        wait_for_ctrl_c()


if __name__ == "__main__":
    main()
