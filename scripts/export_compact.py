#!/usr/bin/env python3
"""Export a CHEX classification model for deployment: checkpoint → compact model → FLOPs report → ONNX (checked
against onnxruntime) and a torch.export program (.pt2).

The input is anything CLS/main.py can load (CLS.model.read_weight_file): its ``compact.pth``, one of its training
checkpoints, an upstream released checkpoint (dense, pruned channels zeroed) or a plain state dict. A masked dense
model is compacted first with chex_core.compact_model (a channel is pruned when its norm gamma and beta are both zero,
in every norm of a residual stream for --chex-residual runs);
``--save-compact`` keeps that compact checkpoint (weights_only-loadable, no project classes in the pickle).

Examples:
  python scripts/export_compact.py logs/compact.pth --onnx rn50.onnx --program rn50.pt2
  python scripts/export_compact.py resnet50_2G.pth.tar --arch resnet50 --save-compact rn50_2G_compact.pth
Exit codes: 0 ok, 1 an exported graph disagrees with the eager model, 2 bad command line or input file.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("export_compact")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="compact.pth, a CLS/upstream checkpoint or a state dict")
    p.add_argument("--onnx", metavar="PATH", help="ONNX output file (default: the checkpoint path with .onnx)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--program", metavar="PATH",
                   help="torch.export program output file (default: the checkpoint path with .pt2)")
    p.add_argument("--no-program", action="store_true", help="skip the torch.export export")
    p.add_argument("--save-compact", metavar="PATH", help="also write the compact checkpoint to PATH")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version, >= 17 (default: %(default)s)")
    p.add_argument("--arch", help="ResNet of the checkpoint (default: the one recorded in it)")
    p.add_argument("--num-classes", type=int,
                   help="classifier outputs (default: recorded in the checkpoint, else the fc weight's rows)")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool (default: as recorded in the checkpoint, else off)")
    p.add_argument("--image-size", type=int,
                   help="square input size in pixels for the FLOPs report and the export example "
                        "(default: recorded in the checkpoint, else 224)")
    p.add_argument("--batch", type=int, default=2,
                   help="example batch used for tracing; >= 2 unless --static-batch (default: %(default)s)")
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch dimension to --batch instead of exporting it as dynamic")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare each exported graph with the eager model on random inputs (default: on)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="absolute tolerance of the parity checks, in logit units (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (default: %(default)s)")
    return p


def load_compact(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(compact eval-mode model, compact checkpoint dict, image size) from ``args.checkpoint``; user mistakes end in
    ``parser.error``."""
    from chex_core import compact_model, resnet_groups
    from CLS import model as cls_model
    from chex_tasks.export import make_compact_checkpoint

    try:
        state, meta = cls_model.read_weight_file(args.checkpoint)
    except cls_model.WeightsError as e:
        parser.error(f"checkpoint: {e}")
    arch = args.arch or meta["arch"]
    if arch is None:
        parser.error("--arch: the checkpoint does not record its architecture; give it "
                     f"({', '.join(cls_model.ARCHS)})")
    if arch not in cls_model.ARCHS:
        parser.error(f"--arch: {arch!r} is not one of {', '.join(cls_model.ARCHS)}")
    num_classes = args.num_classes or meta.get("num_classes")
    if num_classes is None:
        fc = state.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None else 1000
    cifar_stem = bool(args.cifar_stem if args.cifar_stem is not None else meta.get("cifar_stem") or False)
    image_size = int(args.image_size or meta.get("image_size") or 224)

    model = cls_model.build_model(arch, int(num_classes), cifar_stem=cifar_stem)
    try:
        cls_model.load_weights(model, state, source=args.checkpoint, arch=arch, cfg=meta.get("cfg"))
    except cls_model.WeightsError as e:
        parser.error(f"checkpoint: {e}")
    model.eval()
    spec = meta.get("cfg") or cls_model.width_spec_from_state_dict(model, state)
    if not spec:
        # a dense model whose pruned channels are zeros (training checkpoint / upstream release): remove them;
        # residual streams (--chex-residual runs) only where some channel is zero in every norm of the stream
        groups = resnet_groups(model, residual=True)
        masks = cls_model.masks_from_zeros(model, groups)
        groups = [g for g in groups if g.kind != "residual" or not bool(masks[g.name].all())]
        model, spec = compact_model(model, groups, masks)
        model.eval()
        log.info("compacted the masked model: %d of %d prunable channels kept", sum(spec.values()),
                 sum(g.size for g in groups))
    ckpt = make_compact_checkpoint(model, spec, arch=arch, num_classes=int(num_classes), image_size=image_size,
                                   cifar_stem=cifar_stem)
    return model, ckpt, image_size


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs every graph pass at INFO
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    if args.opset < 17:
        parser.error(f"--opset: must be >= 17, got {args.opset}")
    if args.batch < 1 or (not args.static_batch and args.batch < 2):
        parser.error(f"--batch: must be >= 2 for a dynamic-batch export (or pass --static-batch), got {args.batch}")
    if args.atol <= 0:
        parser.error(f"--atol: must be > 0, got {args.atol}")
    if args.image_size is not None and args.image_size < 8:
        parser.error(f"--image-size: must be >= 8 pixels, got {args.image_size}")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes: must be >= 1, got {args.num_classes}")
    if args.no_onnx and args.no_program and not args.save_compact:
        parser.error("--no-onnx and --no-program leave nothing to do (add --save-compact or drop one of them)")

    import torch

    from chex_tasks import export as ex

    with torch.no_grad():   # scoped, not global: main() is also called in-process
        model, ckpt, image_size = load_compact(parser, args)
        input_size = (3, image_size, image_size)
        rep = ex.flops_report(model, input_size)
        log.info("%s compact model at %dx%d: %.4g G MACs (paper 'FLOPs'; FlopCounterMode %.4g G), %.4g M params, "
                 "%d pruned layers", ckpt["arch"], image_size, image_size, rep["macs"] / 1e9,
                 rep["flop_counter_macs"] / 1e9, rep["params"] / 1e6, len(ckpt["width_spec"]))
        try:
            if args.save_compact:
                ex.save_compact_checkpoint(ckpt, args.save_compact)
                ex.assert_portable(args.save_compact)
                log.info("wrote compact checkpoint %s (weights_only-loadable, torch globals only)", args.save_compact)

            stem = os.path.splitext(args.checkpoint)[0]
            example = ex.example_input(input_size, batch=args.batch, seed=0)
            # parity inputs: batch 1 and a batch other than the traced one, so a wrongly static batch is caught
            inputs = [ex.example_input(input_size, batch=b, seed=1 + b)
                      for b in ((args.batch,) if args.static_batch else (1, args.batch + 1))]
            if not args.no_onnx:
                path = ex.export_onnx(model, args.onnx or stem + ".onnx", example, opset=args.opset,
                                      dynamic_batch=not args.static_batch)
                log.info("wrote ONNX (opset %d) %s", args.opset, path)
                if args.check:
                    err = ex.onnx_parity(model, path, inputs, atol=args.atol)
                    log.info("onnxruntime parity ok: max abs error %.3g on batches %s", err,
                             [x.shape[0] for x in inputs])
            if not args.no_program:
                path = args.program or stem + ".pt2"
                ex.export_program(model, example, path, dynamic_batch=not args.static_batch)
                log.info("wrote torch.export program %s", path)
                if args.check:
                    err = ex.program_parity(model, path, inputs, atol=args.atol)
                    log.info("torch.export parity ok (reloaded %s): max abs error %.3g on batches %s", path, err,
                             [x.shape[0] for x in inputs])
        except ex.ExportError as e:
            log.error("%s", e)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
