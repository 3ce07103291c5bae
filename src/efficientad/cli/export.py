"""``efficientad export``: write a trained model as ONNX, TorchScript or OpenVINO IR for deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import EXPORT_FORMATS, INPUT_DTYPES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX, TorchScript or OpenVINO",
        description="Export the whole inference path (normalisation, networks, maps, resize, score) of a model "
        "file. The exported file embeds the image size, input dtype and threshold; load it with "
        "efficientad.Inferencer (or serve it with `efficientad serve --model FILE`). Input: 'images' (N, 3, H, W) RGB; outputs: score (N,), anomaly_map, "
        "local_map, global_map (N, 1, h, w), see --output-size.",
    )
    parser.add_argument("--model", required=True, help="model file written by `efficientad train`")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    parser.add_argument("--out", required=True, help="output file (OpenVINO: NAME.xml, with NAME.bin beside it)")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold to embed (default: the model's own)")
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default="float32",
        help="float32 (default) takes images in [0, 1]; uint8 takes raw bytes and folds the /255 into the graph",
    )
    parser.add_argument("--output-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="size of the map outputs (default: the padded feature grid, 64x64 for 256x256 images, which a bilinear resize "
        "to the image's size turns into the reference's map; the score is always taken at the model's image size)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy.formats import export_model
    from ..files import check_output_folder

    check_output_folder(Path(args.out).parent)
    path = export_model(
        args.model,
        args.format,
        args.out,
        threshold=args.threshold,
        output_size=None if args.output_size is None else tuple(args.output_size),
        input_dtype=args.input_dtype,
    )
    print(f"wrote {path} (checked: it reproduces the model's scores)")
    return 0
