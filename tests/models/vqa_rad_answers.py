"""What ``medtune eval run`` answers to some VQA-RAD test questions: the seed fixtures' end-to-end checks compare
it with the answers file the seed's own evaluation script wrote."""
from __future__ import annotations

import json
from pathlib import Path

from medtune.cli import main

VQA_RAD_IMAGES = Path(__file__).parents[2] / "data" / "vqa_rad" / "images"


def medtune_answers(model_dir: Path, question_ids: set[str], work: Path, prompt_style: str) -> dict[str, str]:
    """``{question id: answer}`` of ``medtune eval run --prompt-style STYLE`` on the imported model at
    ``model_dir`` over those questions of the bundled test split (converted to canonical JSON Lines in ``work``)."""
    converted = work / "test.jsonl"
    assert main(["data", "convert", "--from", "vqa-rad", "--to", "canonical", "data/vqa_rad/testset.json",
                 str(converted)]) == 0
    subset = work / "subset.jsonl"
    subset.write_text("".join(line + "\n" for line in converted.read_text().splitlines()
                              if json.loads(line)["id"] in question_ids))
    assert main(["eval", "run", "--data", str(subset), "--gt-format", "canonical", "--image-root",
                 str(VQA_RAD_IMAGES), "--model", str(model_dir), "--prompt-style", prompt_style, "--out", str(work / "eval")]) == 0
    return {json.loads(line)["id"]: json.loads(line)["prediction"]
            for line in (work / "eval" / "predictions.jsonl").read_text().splitlines()}
