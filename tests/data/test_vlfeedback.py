"""VLFeedback: ranked completions become preference pairs as the Silkie authors' run_dpo.py makes them (every two
completions compared by their mean rating, ties and unrated completions out), from the JSON Lines release and from
a datasets Parquet export whose completions are stored column-wise."""
import json

import suite_fixtures

from medtune.data.formats import detect_format, read_records
from medtune.data.jsonl import Tally


def _completion(model, response, *ratings):
    aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    return {"annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings)}, "model": model,
            "response": response}


RANKED = {"id": "svit-1", "prompt": "What does the scan show?", "models": ["a", "b", "c", "d"],
          "img_path": "svit/1.jpg", "completions": [
              _completion("a", "A chest X-ray with clear lungs.", "5", "4", "3"),   # mean 4
              _completion("b", "A cat.", "2", "3", "3"),                           # 2.67
              _completion("c", "A frontal chest radiograph.", "4", "4", "4"),      # 4: ties with a
              _completion("d", "Unsure.", "N/A", "1", "1")]}                       # unrated
TIED = {"id": "tie", "prompt": "Any fracture?", "models": ["a", "b"], "img_path": "svit/2.jpg",
        "completions": [_completion("a", "No.", "3", "3", "3"), _completion("b", "None seen.", "3", "3", "3")]}
NO_RESPONSE = {"id": "broken", "prompt": "Describe.", "models": ["a"], "img_path": "svit/3.jpg",
               "completions": [_completion("a", "", "3", "3", "3")]}


def test_every_two_completions_make_a_pair_by_mean_rating_without_ties_or_unrated_ones(tmp_path):
    path = tmp_path / "vlfeedback_80k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (RANKED, TIED, NO_RESPONSE)))
    assert detect_format(path) == "vlfeedback"
    tally = Tally()
    pairs = list(read_records("vlfeedback", path, tally=tally))
    assert [p.id for p in pairs] == ["svit-1/0-1", "svit-1/2-1"]
    assert [(p.messages[-1].text, p.rejected.text) for p in pairs] == [
        ("A chest X-ray with clear lungs.", "A cat."), ("A frontal chest radiograph.", "A cat.")]
    assert pairs[0].question == "What does the scan show?" and pairs[0].images[0].path == "svit/1.jpg"
    assert pairs[0].meta.extra == {"chosen_model": "a", "rejected_model": "b", "chosen_rating": 4.0,
                                   "rejected_rating": 8 / 3}
    assert (tally.read, dict(tally.skipped)) == (3, {"unrated completion": 1, "no preference": 1,
                                                     "completion has no text": 1})
    assert any("completion 0 has no 'response' text" in line for line in tally.details())


def test_the_parquet_export_with_column_wise_completions_and_embedded_images_reads_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column_wise(completions):
        return {key: [c[key] for c in completions] for key in ("annotations", "model", "response")}

    table = pa.table({"id": [RANKED["id"]], "prompt": [RANKED["prompt"]], "models": [RANKED["models"]],
                      "completions": [column_wise(RANKED["completions"])],
                      "image": pa.array([{"bytes": suite_fixtures.png_bytes(40), "path": "1.jpg"}],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "vlfeedback"
    pairs = list(read_records("vlfeedback", path, tally=Tally()))
    assert [p.id for p in pairs] == ["svit-1/0-1", "svit-1/2-1"]
    assert (path.parent / pairs[0].images[0].path).read_bytes() == suite_fixtures.png_bytes(40)
