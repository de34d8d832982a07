"""`worldmodels.objdet.calibrate`: the bias shift that makes the expert's fixed 0.5 keep what the
F1-best threshold keeps, on a real (untrained, tiny) RT-DETR and real tabletop scenes."""

from __future__ import annotations

from dataclasses import replace

import torch

from precompute.sources.tabletop import TabletopWorld
from worldmodels import objdet


def test_calibrate_moves_the_f1_best_threshold_to_the_experts() -> None:
    config = replace(objdet.ObjDetStandinConfig(), **objdet.FAST)
    world = TabletopWorld(seed=1)
    processor = objdet.build_processor(64)
    pixels, _ = objdet.render_split(world, "train", 6, 64, processor)
    model = objdet.build_rtdetr(config, 0, world.detection_classes).eval()
    head = model.model.decoder.class_embed[-1]
    with torch.no_grad():  # put the untrained model's scores around 0.3 so the grid can tell them apart
        top = objdet.predict(model, pixels).logits.amax(-1).amax(-1).median()
        head.bias += torch.logit(torch.tensor(0.31)) - top  # off the grid: no score sits on a threshold
    before = objdet.predict(model, pixels)
    # The truth is what the model itself keeps at 0.3: F1 is below 1 at 0.5 (it keeps less).
    kept = processor.post_process_object_detection(before, threshold=0.3, target_sizes=[(64, 64)] * len(pixels))
    targets = [{"boxes": d["boxes"] / 64, "class_labels": d["labels"]} for d in kept]
    assert sum(len(t["boxes"]) for t in targets) >= 3
    assert objdet.score_detections(processor, before, targets, 64, objdet.THRESHOLD)["f1"] < 1.0

    chosen = objdet.calibrate(model, processor, pixels, targets, 64)

    f1_before = {t: objdet.score_detections(processor, before, targets, 64, t)["f1"] for t in objdet.CALIBRATION_GRID}
    assert chosen < objdet.THRESHOLD and f1_before[chosen] == max(f1_before.values()) > f1_before[objdet.THRESHOLD]
    after = objdet.evaluate(model, processor, pixels, targets, 64)  # at the expert's 0.5
    assert abs(after["f1"] - f1_before[chosen]) < 1e-9
    ranking = lambda outputs: outputs.logits.flatten(1).argsort(-1, descending=True)[:, :5]  # noqa: E731
    assert torch.equal(ranking(objdet.predict(model, pixels)), ranking(before))  # a monotone shift only
