"""What a run needs made before it trains: the demo's synthetic shapes set (and, for the grounding demo,
its multi-scale records), its pretrained tower and (X-Former's demo) its pretrained MAE, each built on
first use when the config asks for it (``config.shapes``, ``config.multiscale``, ``config.demo_tower``,
``config.demo_mae``).

    prepare.prepare_run(config, workdir)   # then train.run(config, workdir)
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from etils import epath

from pargo_jax import paths
from pargo_jax.models import projectors


def prepare_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The demo's data, tower and MAE for a run of ``config`` in ``workdir``; nothing for other configs."""
    prepare_data(config, workdir)
    prepare_demo_tower(config)  # before the mesh: their pretraining runs on one device
    prepare_demo_mae(config)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The demo's shapes set is built into ``{workdir}/data`` on first run (seconds), by process 0
    while the others wait."""
    if config.get("shapes") is None:
        return
    from data_pipelines import shapes  # tensorflow_datasets: only when a demo run needs it

    data_dir = paths.join(config.input.get("data_dir") or paths.join(workdir, "data"))
    built = None
    if jax.process_index() == 0:
        built = shapes.ensure(data_dir, progress=True, **config.shapes.to_dict())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("shapes data built")
    if config.get("multiscale") is not None:  # TinyGroundingGPT's demo: its words are a superset of shapes'
        from data_pipelines import multiscale

        if jax.process_index() == 0:
            multiscale.ensure_shapes(data_dir, progress=True, **config.multiscale.to_dict())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("multi-scale data built")
        with config.unlocked():
            config.input.tokenizer = config.input.get("tokenizer") or paths.join(
                data_dir, multiscale.TOKENIZER_DIR
            )
    with config.unlocked():
        config.input.data_dir = data_dir
        if not config.input.get("tokenizer"):
            config.input.tokenizer = paths.join(data_dir, "shapes_tokenizer")
    if projectors.has_text_branch(config.model.projector.get("name", "")) and not config.input.get(
        "qformer_tokenizer"
    ):  # a Q-Former reads the captions with the shapes words, <s> ... </s> and [DEC]
        from data_pipelines.text import prepare_qformer_tokenizer

        path = paths.join(data_dir, "shapes_qformer_tokenizer")
        if jax.process_index() == 0 and not epath.Path(path, "tokenizer.json").exists():
            prepare_qformer_tokenizer(config.input.tokenizer, path, cls_token="<s>", sep_token="</s>")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("Q-Former tokenizer written")
        with config.unlocked():
            config.input.qformer_tokenizer = path
    if built and built["summary"] is not None:
        logging.info("Built the shapes dataset in %s (%.1f s).", data_dir, built["seconds"])


def prepare_demo_tower(config: ml_collections.ConfigDict) -> None:
    """The demo's pretrained tower is built at ``model.vision.path`` on first run (``config.demo_tower``
    holds the build options), by process 0 while the others wait."""
    if config.get("demo_tower") is None:
        return
    from pargo_jax import demo_tower

    _build_once(config, "demo_tower", config.model.vision, demo_tower.ensure, "demo tower")


def prepare_demo_mae(config: ml_collections.ConfigDict) -> None:
    """X-Former's demo MAE is built at ``model.detail.path`` on first run (``config.demo_mae`` holds the
    build options), by process 0 while the others wait."""
    if config.get("demo_mae") is None:
        return
    if not (config.model.get("detail") or {}).get("path"):
        raise ValueError("config.demo_mae builds the demo MAE at config.model.detail.path: set that path.")
    from pargo_jax import demo_mae

    _build_once(config, "demo_mae", config.model.detail, demo_mae.ensure, "demo MAE")


def _build_once(config: ml_collections.ConfigDict, section: str, target, ensure, what: str) -> None:
    """``ensure(target.path, **config[section])`` on process 0 while the others wait; ``target.path``
    made absolute."""
    path = paths.join(target.path)
    if jax.process_index() == 0 and ensure(path, **config[section].to_dict()):
        logging.info("Built the %s in %s.", what, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"{what} built")
    with config.unlocked():
        target.path = path
