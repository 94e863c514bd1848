"""The synthetic shapes world (issue 7): where SFT, then GRPO on the four rewards, runs end to end on 2 CPU cores.

* `world`: prompt grammar and parser (`parse_prompt`), spatial predicates, valid layouts, `sample_scene`,
  `gt_chain`, fixed train/validation `splits`.
* `render`: flat-colour scenes at 64 px (`render_scene`).
* `judge`: `ShapesJudge`, the exact programmatic judge (R_PI, R_sem, R_spa, R_RI; `exact_match`; `summarise`).
* `vq`: the tiny `JanusVQVAE` trained on rendered scenes (`python -m gotr1.shapes.vq` rebuilds the shipped one).
* `base`: `build_shapes_base` (a tiny Janus carrying that VQ) and `sft_examples` (prompt, chain, image codes).

Modules are imported explicitly (`from gotr1.shapes.judge import ShapesJudge`): the world and the judge need no
transformers import, which keeps prompt checking and scoring cheap to start.
"""
