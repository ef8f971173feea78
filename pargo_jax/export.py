"""Export a trained run to PyTorch: ``python -m pargo_jax.export --workdir W [--step N] --out DIR``.

Writes, with LoRA merged into the LLM weights:

  DIR/               a transformers model directory with custom code (``config.json`` with ``auto_map``,
                     ``configuration_pargo.py``, ``modeling_pargo.py``, safetensors, tokenizer files,
                     ``generation_config.json``, ``preprocessor_config.json``):
                     ``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)``
                     computes the JAX model's logits; its ``generate`` takes ``input_ids`` with the
                     image token expanded (as ``pargo_jax.predict`` builds them) and ``pixel_values``
                     (B, 3, H, W), normalized with the preprocessor's mean / std.
                     SigLIP / CLIP towers from transformers, EVA02 in the written code.
                     ``generation_config.json``'s ``box_codec`` (``{"format", "frame"}``, the run's
                     ``config.box_codec``) says how answers write boxes (``GenerationConfig.box_codec``).
  DIR/llm/           the LLM alone as a standard HF directory (``AutoModelForCausalLM`` for Llama /
                     Qwen2 / OPT; InternLM2 in its own layout, which transformers runs with its remote
                     code)
  DIR/vision_tower/  the tower in its source format (HF dir for SigLIP / CLIP, EVA02 state dict; a
                     BLIP-2 tower is skipped: it stays frozen, its BLIP-2 checkpoint holds it)
  DIR/detail_tower/  X-Former's MAE as an HF ViTMAEForPreTraining directory
  DIR/llm_adapter/   the LoRA adapters as a PEFT directory over the LLM the run started from (when
                     only they trained in the LLM)
  DIR/official/pytorch_model.bin  the release's whole-model layout (EVA02 + released raster ParGo +
                     InternLM2), read back by ``pargo_jax.convert.official.load_model``

Every part that cannot be written for this model is named with the reason, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipelines.boxes import BoxCodec
from pargo_jax.lora import merged
from pargo_jax.models.mllm import MLLMConfig
from pargo_jax.param_tree import flat_arrays, flatten

HF_CODE = os.path.join(os.path.dirname(__file__), "convert", "hf_code")
CODE_FILES = ("configuration_pargo.py", "modeling_pargo.py")


def projector_tensors(params: Mapping[str, Any], p, num_patches: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(projector_config, tensors) of the exported model's projector ``p`` (a projector config) over
    ``num_patches`` tower tokens: ParGo in the official names plus its masks as buffers, or the MLP's
    two Linears."""
    from pargo_jax.convert import official
    from pargo_jax.models import masks, projectors

    flat = flat_arrays(params)
    name = projectors.projector_name(p)
    if name == "mlp":
        out = {f"{fc}.{w}": (flat[f"{fc}/kernel"].T if w == "weight" else flat[f"{fc}/bias"])
               for fc in ("fc1", "fc2") for w in ("weight", "bias")}  # fmt: skip
        return {"name": "mlp", "group": p.group}, out
    if not hasattr(p, "num_partial"):
        raise ValueError(f"The {name!r} projector has no PyTorch export.")
    if p.num_crops != 1:
        raise ValueError(f"num_crops={p.num_crops}: the exported model runs one crop per image.")
    out = official.to_official_state_dict(flat)
    out["self_masks"] = masks.self_masks(p.num_partial, p.num_global, p.layers, p.cpp, p.cascade_schedule)
    out["cross_mask"] = masks.partial_global_cross_mask(
        p.num_partial, p.num_global, num_patches, layout=p.layout, num_crops=1, grid=p.grid
    )
    fields = ("hidden", "heads", "layers", "mlp_dim", "num_queries", "max_positions", "eps", "vision_eps")
    config = {"name": "pargo", **{f: getattr(p, f) for f in fields}}
    return config, out


def save_transformers(
    out: str,
    mcfg: MLLMConfig,
    params: Mapping[str, Any],
    tokenizer,
    *,
    box_codec: BoxCodec | None = None,
    max_shard_bytes=2 << 30,
) -> str:
    """The transformers custom-code directory of a model (params as numpy or jax arrays); ``box_codec``
    (the run's; default norm3 / square) goes into ``generation_config.json``."""
    from pargo_jax.convert import hf, hf_vision
    from pargo_jax.convert.tables import save_safetensors

    v = mcfg.vision
    vision_config, vision = hf_vision.export_vision(params["vision_tower"], v)
    projector_config, projector = projector_tensors(params["projector"], mcfg.projector, v.num_tokens)
    llm_params, llm_cfg = merged(params["llm"], mcfg.llm)
    flat_llm = flat_arrays(llm_params)
    if llm_cfg.fused_qkv:  # transformers runs InternLM2's function as Llama with q / k / v apart
        flat_llm, llm_cfg = hf.unfuse_qkv(flat_llm, llm_cfg), dataclasses.replace(llm_cfg, fused_qkv=False)
    kind = llm_cfg.family if llm_cfg.family in ("qwen2", "opt") else "llama"
    text_config, llm = hf.export_llm(flat_llm, llm_cfg, kind)
    tensors = {f"vision_tower.{k}": x for k, x in vision.items()}
    tensors.update({f"projector.{k}": np.asarray(x) for k, x in projector.items()})
    tensors.update({f"language_model.{k}": x for k, x in llm.items()})
    os.makedirs(out, exist_ok=True)
    config = dict(
        model_type="pargo",
        architectures=["PargoForConditionalGeneration"],
        auto_map={
            "AutoConfig": "configuration_pargo.PargoConfig",
            "AutoModelForImageTextToText": "modeling_pargo.PargoForConditionalGeneration",
        },
        tower_config={**vision_config, "final_norm": v.apply_final_norm, "drop_cls": v.drop_cls},
        projector_config=projector_config,
        lm_config=text_config,
        image_token_id=mcfg.image_token_id,
        num_image_tokens=mcfg.num_image_tokens,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    _write_json(out, "config.json", config)
    for f in CODE_FILES:
        shutil.copy(os.path.join(HF_CODE, f), os.path.join(out, f))
    save_safetensors(out, tensors, max_shard_bytes)
    _write_json(out, "generation_config.json", dict(
        eos_token_id=list(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
        do_sample=False, max_new_tokens=64, box_codec=(box_codec or BoxCodec()).as_dict(),
    ))  # fmt: skip
    _write_json(out, "preprocessor_config.json", dict(
        image_size=v.image_size, image_mean=list(mcfg.pixel_mean), image_std=list(mcfg.pixel_std),
        input="(B, 3, H, W) float pixels in [0, 1], normalized (x - mean) / std",
    ))  # fmt: skip
    tokenizer.save(out)
    return out


def _write_json(out: str, name: str, data: dict) -> None:
    with open(os.path.join(out, name), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def export_workdir(
    workdir: str, out: str, step: int | None = None, *, max_shard_bytes: int = 2 << 30
) -> dict:
    """Everything :mod:`pargo_jax.export` writes for a run's checkpoint ``step`` (None: the newest);
    returns ``{part: path or "skipped: reason"}``."""
    import jax

    from pargo_jax import runs
    from pargo_jax.convert import hf, hf_vision

    run = runs.load_workdir(workdir, step=step)
    params = jax.device_get(run.params)
    mcfg, done = run.mcfg, {}
    try:
        if mcfg.high_res:
            raise ValueError(
                "MG-LLaVA's high-res path (ConvNeXt, fusion, object tokens) has no PyTorch export."
            )
        done["transformers"] = save_transformers(
            out, mcfg, params, run.tokenizer, box_codec=run.box_codec, max_shard_bytes=max_shard_bytes
        )
    except ValueError as e:
        done["transformers"] = f"skipped: {e}"
    llm_params, llm_cfg = merged(params["llm"], mcfg.llm)
    done["llm"] = hf.save_llm(os.path.join(out, "llm"), llm_params, llm_cfg, max_shard_bytes=max_shard_bytes)
    run.tokenizer.save(done["llm"])
    done["llm_adapter"] = save_adapter(os.path.join(out, "llm_adapter"), params["llm"], run)
    done["vision_tower"] = _or_skipped(
        hf_vision.save_vision, os.path.join(out, "vision_tower"), params["vision_tower"], mcfg.vision
    )
    if mcfg.detail:  # X-Former's MAE, as an HF ViTMAEForPreTraining directory
        from pargo_jax.convert import hf_mae

        done["detail_tower"] = hf_mae.save_mae(os.path.join(out, "detail_tower"), params["detail_tower"],
                                               mcfg.detail.mae)  # fmt: skip
    done["official"] = (
        save_official(os.path.join(out, "official"), mcfg, params)
        if not mcfg.high_res else "skipped: the release's format has no high-res path"
    )  # fmt: skip
    codec = run.box_codec.as_dict()
    _write_json(
        out, "export.json", {"workdir": str(workdir), "step": run.step, "box_codec": codec, "parts": done}
    )
    return {"step": run.step, **done}


def _or_skipped(write, *args) -> str:
    """``write(*args)``'s path, or ``"skipped: why"`` when the part has no export (a ValueError)."""
    try:
        return write(*args)
    except ValueError as e:
        return f"skipped: {e}"


def save_adapter(out: str, llm_params: Mapping[str, Any], run) -> str:
    """The run's LoRA adapters as a PEFT directory over the LLM it started from (``model.llm.path``),
    or ``"skipped: why"`` (no LoRA, or LLM weights besides the adapters trained: use ``DIR/llm``)."""
    from pargo_jax.convert import hf
    from pargo_jax.lora import LORA_PATH_REGEX
    from pargo_jax.optim import trainable_labels

    labels = flatten(trainable_labels({"llm": llm_params}, dict(run.config.trainable), strict=False))
    lora = lambda path: re.fullmatch(LORA_PATH_REGEX, path)
    if not any(map(lora, labels)):
        return "skipped: the LLM has no LoRA adapters"
    base = sorted(k for k, label in labels.items() if label != "frozen" and not lora(k))
    if base:
        return f"skipped: LLM weights besides the LoRA adapters were trained ({base[0]}, ...); use DIR/llm"
    return hf.save_peft_adapter(out, llm_params, run.mcfg.llm)


def save_official(out: str, mcfg: MLLMConfig, params: Mapping[str, Any]) -> str:
    """``out/pytorch_model.bin`` in the release's layout, or ``"skipped: why"``."""
    from pargo_jax.convert.official import to_official_checkpoint

    try:
        state = to_official_checkpoint(mcfg, params)
        import torch
    except (ValueError, ImportError) as e:
        return f"skipped: {e}"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "pytorch_model.bin")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    parts = export_workdir(f.workdir, f.out, f.step if f.step >= 0 else None)
    print(f"Exported {f.workdir} step {parts.pop('step')} to {f.out}:")
    for part, where in parts.items():
        print(f"  {part:<13} {where}")


if __name__ == "__main__":
    from absl import flags

    from pargo_jax import launcher

    flags.DEFINE_string("workdir", None, "Training run directory (config.json, model.json, checkpoints/).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory.")
    launcher.run(main, required=["workdir", "out"])
