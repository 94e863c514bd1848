"""What users look at: each sample's image, its chain and the planned boxes drawn over and beside the image."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from gotr1.chain import ParsedChain, layout_overlay

_SAMPLE_FILE = re.compile(r"p\d+_s\d+(?:\.png|_layout\.png|_chain\.txt)")  # what `save_groups` names


def save_sample(out_dir: Path, stem: str, *, prompt: str, reasoning_text: str, chain: ParsedChain,
                image: Image.Image | None) -> dict:
    """Write `stem.png` (image), `stem_chain.txt` (UTF-8 whatever the locale: chains hold any character) and
    `stem_layout.png`; return the JSON record of the sample."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}_chain.txt").write_text(reasoning_text + "\n", encoding="utf-8")
    record = {"prompt": prompt, "reasoning": reasoning_text,
              "objects": [asdict(o) for o in chain.objects], "problems": chain.problems}
    if image is not None:
        image.save(out_dir / f"{stem}.png")
        layout_overlay(image, chain.objects).save(out_dir / f"{stem}_layout.png")
        record["image"] = f"{stem}.png"
        record["layout"] = f"{stem}_layout.png"
    return record


def save_groups(out_dir: Path, groups) -> int:
    """Every sample of every group (anything with `.prompt` and `.samples` or a list of samples), plus
    `samples.jsonl`; returns the number of samples written. The sample files of an earlier save into the same
    folder go first, so the folder holds exactly what `samples.jsonl` lists; other files are left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.iterdir():
        if _SAMPLE_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()
    count = 0
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for p, group in enumerate(groups):
            for s, sample in enumerate(getattr(group, "samples", group)):
                prompt = group.prompt if hasattr(group, "prompt") else sample.prompt
                record = save_sample(out_dir, f"p{p:03d}_s{s:02d}", prompt=prompt,
                                     reasoning_text=sample.reasoning_text, chain=sample.chain, image=sample.image)
                f.write(json.dumps(record) + "\n")
                count += 1
    return count
