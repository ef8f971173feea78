"""The demo experiment made small for tests: configs on a shared small shapes build, metric readers."""

from __future__ import annotations

import json
import os

from experiments import pretrain

SMALL_SHAPES = dict(image_size=64, num_pretrain=256, num_sft=256, num_eval=16, num_val=16)
SMALL_TOWER = dict(steps=20, batch_size=16)  # a barely pretrained demo tower: seconds, not minutes


def build_shapes(path: str) -> str:
    from data_pipelines import shapes

    shapes.ensure(path, **SMALL_SHAPES)
    return path


def demo_flags(data_dir: str) -> list[str]:
    """``--config.*`` flags giving ``python -m pargo_jax.main``'s demo the small shapes build and tower of
    :func:`demo_config`."""
    flags = [f"--config.shapes.{k}={v}" for k, v in SMALL_SHAPES.items()]
    flags += [f"--config.demo_tower.{k}={v}" for k, v in SMALL_TOWER.items()]
    return flags + [f"--config.model.vision.path={os.path.join(data_dir, 'demo_tower')}"]


def demo_config(data_dir: str, steps: int, *, stage=pretrain, preset: str | None = None, **overrides):
    """The ``preset`` (default ``demo``) of ``stage`` on ``data_dir`` for ``steps`` steps, logging every
    step, no sample, on ONE device unless ``overrides`` name the mesh (``"mesh"`` or ``"mesh.*"``): 8
    fake devices cost partitioning and collectives that only sharding tests need. ``overrides``:
    ``{"section.field": value}``."""
    c = stage.get_config(preset)
    c.shapes.update(SMALL_SHAPES)
    c.demo_tower.update(SMALL_TOWER)
    c.model.vision.path = os.path.join(data_dir, "demo_tower")  # built once per shapes build
    c.input.data_dir = data_dir
    c.total_steps = steps
    c.optim.warmup_steps = min(c.optim.warmup_steps, steps)
    c.log_every_steps = 1
    c.sample_at_end = ""
    if not any(k == "mesh" or k.startswith("mesh.") for k in overrides):
        c.mesh.num_devices = 1
    return override(c, overrides)


def prepare_and_train(config, workdir: str) -> dict:
    """What ``python -m pargo_jax.main`` runs on its config: the prepare step (the demo's data and
    tower), then :func:`pargo_jax.train.run`; returns its final metrics."""
    from pargo_jax import prepare, train

    prepare.prepare_run(config, workdir)
    return train.run(config, workdir)


def override(config, overrides: dict):
    """Sets ``{"section.field": value}`` (top-level keys too) as ``--config.section.field=value`` would."""
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        node = config
        for part in section.split(".") if section else ():
            node = node[part]
        node[field] = value
    return config


def metric_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}  # eval rows hold eval/*


def eval_metrics(workdir: str, name: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of evaluator ``name`` as the run logged them."""
    prefix = f"eval/{name}/"
    out: dict[int, dict[str, float]] = {}
    for r in metric_rows(workdir):
        vals = {k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix)}
        if vals:
            out.setdefault(r["step"], {}).update(vals)
    return out


def word_tokenizer(path, words: list[str], specials: list[str], config: dict) -> str:
    """A word-level HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``), as an LLM
    ships it: no ``<image>`` token. ``words[0]`` is the unknown token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    hf.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def bert_tokenizer(path, words: list[str]) -> str:
    """A BERT-style (``bert-base-uncased``-like) WordPiece tokenizer directory: ``[PAD] [UNK] [CLS] [SEP]
    [MASK]``, then ``words``, single characters and their ``##`` continuations (so any lowercase ASCII text
    has no ``[UNK]``); BERT's normalizer (lowercasing), pre-tokenizer, ``[CLS] $A [SEP]`` post-processor
    and decoder, and a ``tokenizer_config.json`` naming the special tokens. No ``[DEC]``."""
    import string

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits
    vocab: dict[str, int] = {}
    for t in specials + list(words) + list(chars + string.punctuation) + ["##" + c for c in chars]:
        vocab.setdefault(t, len(vocab))
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    hf.decoder = decoders.WordPiece(prefix="##")
    hf.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    hf.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    config |= {f"{k}_token": t for k, t in zip(("pad", "unk", "cls", "sep", "mask"), specials, strict=True)}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)
