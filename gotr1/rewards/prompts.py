"""The judge's instructions (paraphrases of GoT-R1's rubrics, paper v2 App. D) in Qwen2.5-VL's chat format.

Every rubric asks for `{"score": N}` and nothing else: `expected` mode then reads the score's distribution right
after the forced answer prefix `{"score": `, and `generate` mode parses the short JSON the judge writes. (The paper
asks for reasoning fields before the score; they are dropped so the score is the first thing answered.)
"""
from __future__ import annotations

from dataclasses import dataclass

SYSTEM = "You are a helpful assistant."
ANSWER_PREFIX = '{"score": '
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
GROUNDING = "Locate the {object}, report the bbox coordinates in JSON format."


@dataclass(frozen=True)
class Rubric:
    component: str
    lo: int  # the scale is lo..hi, mapped onto [0, 1]
    hi: int
    image: str | None  # which picture the judge sees: "image" (generated), "layout" (boxes on a canvas), None
    template: str  # formatted with prompt= and reasoning=


def _answer(lo: int, hi: int) -> str:
    # braces doubled: the rubric template is `str.format`ted again with the prompt
    return f'Answer with JSON only, exactly in the form {{{{"score": <integer from {lo} to {hi}>}}}}.'

R_SEM = Rubric("R_sem", 0, 10, None, (
    "You are a professional image caption evaluator. A brief prompt asks for an image; a detailed caption plans "
    "that image. Rate how well the detailed caption realises the brief prompt.\n"
    "Check: completeness (every object, attribute, count and relation of the prompt is planned), no contradiction "
    "with the prompt, internal consistency, and a coherent, well-formed description.\n"
    "Scale: 0 = gibberish or unrelated; 1-2 = severe misalignment; 3-4 = major omissions or contradictions; "
    "5-6 = partly aligned; 7-8 = minor issues; 9-10 = complete, faithful and coherent.\n"
    "Brief prompt: {prompt}\nDetailed caption: {reasoning}\n" + _answer(0, 10)))

R_SPA = Rubric("R_spa", 1, 10, "layout", (
    "The image is a layout plan on a blank canvas: each box marks where an object will be drawn, and the name at "
    "the top-left corner of a box is that object. Judge whether the planned objects and their spatial arrangement "
    "match the prompt.\n"
    "Scale: 8-10 = every object is present and the spatial relations match the prompt; 5-7 = partly matching or "
    "ambiguous; 1-4 = objects missing or relations contradicting the prompt.\n"
    "Prompt: {prompt}\n" + _answer(1, 10)))

R_PI = Rubric("R_PI", 0, 10, "image", (
    "You are an expert in the compositional accuracy of generated images. Judge whether the image matches the "
    "prompt: objects, counts, colours, shapes, textures and spatial relations. Read spatial terms strictly: 'left "
    "of' means the object's centre is left of the other's, 'on top of' means resting on its upper surface, "
    "'above'/'below' compare vertical positions.\n"
    "Scale: 8-10 = matches the prompt perfectly; 5-7 = minor mismatches; 0-4 = major mismatches or missing "
    "objects.\nPrompt: {prompt}\n" + _answer(0, 10)))

RUBRICS = (R_PI, R_SEM, R_SPA)


def chat(user_text: str, *, image: bool, answer_prefix: str = "") -> str:
    """One Qwen2.5-VL chat turn (its default system prompt), the image first in the user turn, then the text;
    the assistant turn is opened and optionally pre-filled with `answer_prefix`."""
    slot = IMAGE_SLOT if image else ""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{slot}{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer_prefix}")
