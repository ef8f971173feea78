"""The official ParGo checkpoint as a run's workdir, so that ``predict``, ``evaluate``, ``export`` and
fine-tuning use it like any run: the converters read the checkpoint (:mod:`pargo_jax.convert.official`),
an experiment preset describes it and :mod:`pargo_jax.runs` writes the workdir.

    python -m pargo_jax.import_official --checkpoint C --llm_path L --tokenizer T --workdir W
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from data_pipelines.text import Tokenizer
from experiments import sft
from pargo_jax import checkpoints, paths, runs
from pargo_jax.convert.official import load_model

RELEASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# The release's prompt (configs/MMEBench_interLM2-7B.json): "<s>" + system + " USER: <Img><ImageHere></Img>
# {question}\nASSISTANT: ", with the image embeddings at <ImageHere>; answers end with eos.
RELEASE_CHAT_TEMPLATE = (
    "{{ bos_token }}" + RELEASE_SYSTEM + "{% for m in messages %}{% if m['role'] == 'user' %} USER: "
    "{{ m['content'] | replace('<image>\\n', '<Img><image></Img> ') }}\n{% elif m['role'] == 'assistant' %}"
    "ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def to_workdir(
    checkpoint: str,
    llm_path: str,
    tokenizer: str,
    workdir: str,
    *,
    num_partial: int = 288,
    release_input: bool = True,
    **load_options,
) -> str:
    """The official model as a run's workdir (``config.json``, ``model.json``, ``tokenizer/``,
    ``checkpoints/0``), so that ``predict``, ``evaluate``, ``export`` and fine-tuning
    (``checkpoint.init_from``) use it like any run. ``tokenizer``: the LLM's tokenizer prepared with
    ``python -m data_pipelines.text``; with ``release_input`` its chat template becomes the release's
    prompt and images are fed as the release does (``bug_compatible_448_crop``), else the tokenizer's
    own template and a clean letterbox.

    ``python -m pargo_jax.convert.official --checkpoint C --llm_path L --tokenizer T --workdir W``"""
    tok = Tokenizer.load(tokenizer)
    if release_input:
        tok = tok.with_chat_template(RELEASE_CHAT_TEMPLATE)
    config = sft.get_config("paper")
    scan = bool(config.model.llm.overrides.get("scan_layers"))
    model, variables = load_model(
        checkpoint,
        llm_path,
        num_partial=num_partial,
        image_token_id=tok.image_token_id,
        scan_layers=scan,
        **load_options,
    )
    mcfg = model.config
    with config.unlocked():
        config.model.vision.path, config.model.llm.path = checkpoint, llm_path
        config.model.vision.overrides.heads = mcfg.vision.heads
        for k in config.model.projector:  # the preset's ParGo fields, as the checkpoint has them
            if k != "name":
                config.model.projector[k] = getattr(mcfg.projector, k)
        config.input.tokenizer = paths.join(workdir, runs.TOKENIZER_DIR)  # with the chosen template
        config.input.resize = "bug_compatible_448_crop" if release_input else "letterbox"
        config.input.image_size = mcfg.vision.image_size
        config.mesh = dict(data=1, fsdp=-1, tensor=1)
    runs.save_run(workdir, config, mcfg, tok)
    ckpt = checkpoints.Checkpointer(workdir, every_steps=1, async_save=False)
    ckpt.save(0, {"params": jax.tree.map(np.asarray, variables["params"])}, {}, force=True)
    ckpt.close()
    return workdir


def main(argv) -> None:
    """``python -m pargo_jax.import_official``'s work, given its parsed flags."""
    del argv
    f = flags.FLAGS
    out = to_workdir(f.checkpoint, f.llm_path, f.tokenizer, f.workdir, num_partial=f.num_partial,
                     release_input=f.release_input, num_heads=f.num_heads or None,
                     vision_heads=f.vision_heads or None)  # fmt: skip
    print(
        f"Wrote {out}: python -m pargo_jax.evaluate --workdir={out} --evals=experiments/evals.py:mme_release"
    )


if __name__ == "__main__":
    from pargo_jax import launcher

    flags.DEFINE_string("checkpoint", None, "The official ParGo checkpoint (.bin / .pth / .safetensors).")
    flags.DEFINE_string("llm_path", None, "The LLM's HF directory (internlm2-7b).")
    flags.DEFINE_string("tokenizer", None, "The LLM's tokenizer, prepared: python -m data_pipelines.text.")
    flags.DEFINE_string("workdir", None, "Where to write the run directory.")
    flags.DEFINE_integer("num_partial", 288, "Partial queries (not stored in the checkpoint; released: 288).")
    flags.DEFINE_integer("num_heads", 0, "ParGo heads (default hidden // 64).")
    flags.DEFINE_integer("vision_heads", 0, "EVA02 heads (default width // 64).")
    flags.DEFINE_bool("release_input", True, "The release's prompt template and 448-letterbox / 336 crop.")
    launcher.run(main, required=["checkpoint", "llm_path", "tokenizer", "workdir"])
