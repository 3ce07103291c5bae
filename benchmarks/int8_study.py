"""Where int8 loses EfficientAD's accuracy, and whether the export's normal-image proxies see it.

    python benchmarks/int8_study.py --model runs/bottle/model.pt [--category bottle] [--json benchmarks/results/int8_study.json]

For one trained model it quantises the networks (NNCF post-training quantisation, OpenVINO IR; the
map arithmetic stays float) in several ways, and reports for each what the int8 export's acceptance
test measures (image AUROC and AU-PRO of the held-out normal images against their synthetic
defects, the held-out images' score error and each map's quantile spread, all against fp32) beside the same metrics on the
category's test set, which decides nothing here:

* ``fused local head``: teacher and student last convolutions as one convolution over both
  trunks' outputs (the float deployment's graph), all int8;
* ``heads apart``: the export's graph, all int8;
* ``heads apart, X in float``: each layer group of the export's sensitivity pass kept in float alone;
* ``heads apart, after N QAT steps`` (``--qat-steps N``): the networks fine-tuned for N steps with
  fake quantisation first (``export --qat-steps``), all int8; and the same fine-tuned networks in
  fp32, to tell what the fine-tuning changed from what int8 then does.

``--no-float-groups`` leaves out the per-group variants (about a minute each on 2 cores).

Map quantiles are measured again on each variant's held-out maps, as the export does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from efficientad.config import QAT_LEARNING_RATE

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CATEGORIES = {"bottle": ("mvtec", SHARED / "mvtec_ad"), "fryum": ("visa", SHARED / "visa")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model.pt trained on --category")
    parser.add_argument("--category", choices=CATEGORIES, default="bottle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat-steps", type=int, nargs="*", default=[], help="quantisation-aware fine-tuning lengths to try")
    parser.add_argument("--qat-learning-rate", type=float, default=QAT_LEARNING_RATE, help="their learning rate (default: export's, %(default)g)")
    parser.add_argument("--no-float-groups", action="store_true", help="skip the variants that keep one layer group in float")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "int8_study.json")
    args = parser.parse_args()

    from efficientad.data.datasets import load_split, read_mask
    from efficientad.data.images import load_images, to_float
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.graphs import openvino_model
    from efficientad.deploy.quantize import AcceptanceBounds, LabelledImages, acceptance_check, layer_groups, post_training_int8, quantization_images, require_nncf
    from efficientad.deploy.runtimes import OpenVinoSession
    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record

    nncf = require_nncf()
    from efficientad.model import load_model

    model, metadata = load_model(args.model)
    layout, root = CATEGORIES[args.category]
    calibration, validation = quantization_images(metadata, root, args.category, layout)
    acceptance = LabelledImages.with_synthetic_defects(validation)
    split = load_split(layout, root, args.category)
    size = tuple(model.image_size)
    test = LabelledImages(
        [image[None] for image in to_float(load_images([s.path for s in split.test], size)).numpy()],
        list(split.labels),
        np.stack([read_mask(s.mask_paths, size) if s.mask_paths else np.zeros(size, bool) for s in split.test]),
    )
    levels = (metadata["config"]["map_quantile_low"], metadata["config"]["map_quantile_high"])

    def measured(graph, module):
        run = OpenVinoSession(graph, "fp32", args.threads).run
        on_acceptance = acceptance.measure(run, module, levels)
        # The test set scored with the quantiles of the held-out maps, as a deployment scores it.
        on_test = test.measure(run, module, levels, on_acceptance.quantiles)
        return on_acceptance, {"image_auroc": round(on_test.image_auroc, 4), "au_pro": round(on_test.au_pro, 4)}

    modules = {"fused": FusedModel(model), "apart": FusedModel(model, fuse_local_head=False)}
    fine_tuning = {}
    if args.qat_steps:
        from efficientad.deploy.quantize import held_out_split
        from efficientad.training.penalty import PenaltyImages
        from efficientad.training.quantization_aware import fine_tune_for_int8

        train_paths, _ = held_out_split(metadata, root, args.category, layout)
        train_images = load_images(train_paths, size)
        penalty = PenaltyImages(SHARED / "imagenet_samples", size)
        config = metadata["config"]
        for steps in args.qat_steps:
            tuned = fine_tune_for_int8(
                model, train_images, calibration, steps=steps, learning_rate=args.qat_learning_rate, penalty_images=penalty, seed=config["seed"]
            )
            modules[f"qat{steps}"] = tuned.module
            fine_tuning[steps] = tuned.record
    graphs = {name: openvino_model(module) for name, module in modules.items()}
    reference, reference_test = measured(graphs["apart"], modules["apart"])
    rows = [{"variant": "fp32", "proxy": {"image_auroc": reference.image_auroc, "au_pro": reference.au_pro}, "test": reference_test}]

    def quantised(name: str, kept: list[str]):
        return post_training_int8(graphs[name], modules[name], calibration, kept)

    variants = [("fused local head", "fused", []), ("heads apart", "apart", [])]
    if not args.no_float_groups:
        variants += [(f"heads apart, {group} in float", "apart", [group]) for group in layer_groups(modules["apart"])]
    for steps in args.qat_steps:
        variants += [(f"fp32 after {steps} QAT steps", f"qat{steps}", None), (f"heads apart, after {steps} QAT steps", f"qat{steps}", [])]
    for label, name, kept in variants:
        started = time.perf_counter()
        result, on_test = measured(graphs[name] if kept is None else quantised(name, kept), modules[name])
        check = acceptance_check(reference, result, acceptance.n_normal, AcceptanceBounds())
        row = {
            "variant": label,
            "proxy": {key: round(check[key], 4) for key in ("image_auroc", "au_pro", "image_auroc_drop", "au_pro_drop", "validation_score_error_mean", "validation_score_error_max")},
            "map_spread_change": {key: round(value, 3) for key, value in check["map_spread_change"].items()},
            "passed": check["passed"],
            "test": on_test,
            "test_change": {key: round(on_test[key] - reference_test[key], 4) for key in on_test},
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    write_run_record(args.json, {
        "benchmark": "int8_study", "model": str(args.model), "category": args.category,
        "n_calibration_images": len(calibration), "n_validation_images": acceptance.n_normal,
        "n_synthetic_defect_images": len(acceptance.images) - acceptance.n_normal, "n_test_images": len(test.images),
        "nncf": nncf.__version__, "quantization_aware_fine_tuning": fine_tuning, "variants": rows, "system": system_info(threads=args.threads),
    })  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
