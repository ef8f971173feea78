"""Evaluations by name, for ``config.evals`` and for ``--evals=experiments/evals.py:NAME[,NAME...]``.

  python -m pargo_jax.evaluate --workdir=workdir/sft --evals=experiments/evals.py:shapes,val

Each entry is ``dict(type=..., data=dict(name=, split=[, data_dir=]), log_steps=..., batch_size=...)``
plus the evaluator's own options (see ``pargo_jax/evaluators``); ``data_dir`` defaults to the run's
``input.data_dir``. ``log_steps=0``: only when training ends. Entries list every field they use, so
the command line can change any of them (``--config.evals.shapes.batch_size=8``).
"""

import ml_collections

from data_pipelines.shapes import CAPTION_FIELDS
from pargo_jax.configs import ConfigError

B = "benchmarks"  # where the benchmark files live by default; point data.* elsewhere on the command line
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def entry(kind: str, data: dict, *, max_new_tokens: int = 16, method: str = "greedy", **options) -> dict:
    """One eval with every field it reads listed, so any of them can be set on the command line."""
    decode = dict(max_new_tokens=max_new_tokens, method=method, num_beams=4)
    return dict(type=kind, data=data, log_steps=0, batch_size=16, **decode, **options)


EVALS = {
    # The embedded benchmark: accuracy per question kind + grounding Acc@0.5 on held-out questions.
    "shapes": entry("shapes", dict(name="shapes", split="eval"), max_new_tokens=32),
    # Masked loss / token accuracy on held-out captions (stage 1's validation loss), also on the
    # colour, shape, count, digit and position words alone.
    "val": dict(
        type="perplexity", data=dict(name="shapes", split="val"), log_steps=0, batch_size=16,
        groups=CAPTION_FIELDS,
    ),
    # Public benchmarks, each read from its official files (docs/guide/evaluation.md).
    "mme": entry("mme", dict(dir=f"{B}/MME_Benchmark_release_version"), rule="official", prompt_suffix=""),
    "mme_pargo": entry(
        "mme", dict(dir=f"{B}/MME_Benchmark_release_version"), rule="pargo",
        prompt_suffix="Answer the question using a single word(Yes or No)",
    ),
    # MME as the ParGo release runs it (with an official-checkpoint workdir,
    # docs/guide/official_checkpoint.md): its rule and suffix, 4-beam search, 100 new tokens.
    "mme_release": entry(
        "mme", dict(dir=f"{B}/MME_Benchmark_release_version"), max_new_tokens=100, rule="pargo",
        prompt_suffix="Answer the question using a single word(Yes or No)", method="beam",
    ),
    "vqav2": entry(
        "vqa", dict(questions=f"{B}/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                    annotations=f"{B}/vqav2/v2_mscoco_val2014_annotations.json", images=f"{B}/coco/val2014"),
        prompt_suffix=SHORT,
    ),
    "textvqa": entry(
        "vqa", dict(questions="", annotations=f"{B}/textvqa/TextVQA_0.5.1_val.json",
                    images=f"{B}/textvqa/train_images"), prompt_suffix=SHORT,
    ),
    "vizwiz": entry(
        "vqa", dict(questions="", annotations=f"{B}/vizwiz/val.json", images=f"{B}/vizwiz/val"),
        prompt_suffix="When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT,
    ),
    "gqa": entry(
        "gqa", dict(questions=f"{B}/gqa/testdev_balanced_questions.json", images=f"{B}/gqa/images"),
        prompt_suffix=SHORT,
    ),
    "pope": entry(
        "pope", dict(questions=f"{B}/pope/coco_pope_random.json", images=f"{B}/coco/val2014"),
        prompt_suffix=SHORT,
    ),
    "mmbench": entry(
        "multiple_choice", dict(tsv=f"{B}/mmbench/MMBench_DEV_EN.tsv"), max_new_tokens=8, benchmark="mmbench",
        answer_by="generate", circular=True, prompt_suffix=LETTER,
    ),
    "scienceqa": entry(
        "multiple_choice", dict(problems=f"{B}/scienceqa/problems.json",
                                splits=f"{B}/scienceqa/pid_splits.json", images=f"{B}/scienceqa/test",
                                split="test"),
        max_new_tokens=8, benchmark="scienceqa", answer_by="generate", circular=False, prompt_suffix=LETTER,
    ),
    "refcoco": entry(
        "grounding", dict(refs=f"{B}/refcoco/refs(unc).p", instances=f"{B}/refcoco/instances.json",
                          images=f"{B}/coco/train2014", split="val"),
        max_new_tokens=32,
    ),  # boxes in the run's config.box_codec
    "coco_caption": entry(
        "caption", dict(annotations=f"{B}/coco/annotations/captions_val2014.json",
                        images=f"{B}/coco/val2014"),
        max_new_tokens=32, prompt="Provide a one-sentence caption for the provided image.",
    ),
}  # fmt: skip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = [n for n in (arg or "shapes").split(",") if n]
    unknown = sorted(set(names) - set(EVALS))
    if unknown:
        raise ConfigError(f"unknown eval(s) {', '.join(unknown)}; choose from {', '.join(sorted(EVALS))}")
    return ml_collections.ConfigDict({n: EVALS[n] for n in names})
