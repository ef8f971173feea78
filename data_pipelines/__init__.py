"""Data for pargo_jax: one record schema, TFDS ArrayRecord builders, and the grain input pipeline.

schema.py      the record every source converts to (+ skip reasons, ``BadRecord``)
boxes.py       ``BoxCodec``: pixel boxes <-> ``[x1,y1,x2,y2]`` text (norm3 / int1000 / pixel)
frame.py       the square input frame: pixel mean / std, each resize mode's layout (pixels and boxes)
images.py      decode (PIL), resize (letterbox / squash / pad / bug_compatible_448_crop), normalize
text.py        ``Tokenizer`` over ``tokenizers`` + Jinja chat templates, answer masks, ``pack_example``
builders.py    TFDS ``GeneratorBasedBuilder`` base with accounting, ``open_source``, ``write_records``
converters.py  LLaVA JSON, WebDataset tars, COCO captions, RefCOCO/+/g
shapes.py      synthetic shapes set + its word-level tokenizer (``shapes.build(data_dir)``)
multiscale.py  multi-scale alignment records (perception / local crops / global) from any boxed source
build.py       CLI: ``python -m data_pipelines.build --dataset NAME --src ... --data_dir ...``
pipeline.py    ``make_iterator(input_cfg, num_image_tokens=, seed=, ...)``: checkpointable batches
"""
